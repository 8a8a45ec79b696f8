"""Study plans: what a coordinator asks the sites to compute, fixed before any request is sent.

A *plan* is a plain JSON document that describes one federated job completely — a multi-center validation
study (``task = "study"``: the validated ``study.toml``), a federated ComBat (``"harmonize"``) or a model fit
(``"fit"``) — together with the protocol version. Its SHA-256 over canonical JSON is the *plan id*. The
coordinator publishes the plan; each site's operator reads it and approves it (``fedrad site approve PLAN``),
which stores the plan at the site. Every request then carries only the plan id: the site answers only
requests of a plan it approved, and takes every parameter that matters for privacy (columns, folds, penalty
grid, model kinds, number of rounds) from *its own copy* of the plan, never from the request
(:mod:`fedrad.client.guard`).

Everything here is pure (no Flower, no files); the coordinator and the site both call these functions, so
they agree on the id and on the derived request specifications.
"""
from __future__ import annotations

import hashlib
import json
import re
from copy import deepcopy

import numpy as np

from fedrad.common import endpoints

PROTOCOL = "fedrad-plan/1"
#: names a request may use for tables, folds, sources and outputs at a site (never a path)
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: a validation fold: ``final`` or ``loso:<site>``
FOLD = re.compile(r"^(final|loso:[A-Za-z0-9_.-]{1,64})$")
#: columns that identify a patient or a file: never a feature, covariate or outcome
IDENTIFYING_COLUMNS = frozenset({"case_id", "timepoint", "image", "mask", "mask_label", "mask_roi", "patient_id",
                                 "__fedrad_row__"})
#: keys of study.toml that are local to the coordinator's machine (not part of what sites approve)
_LOCAL_STUDY_KEYS = ("output", "file")


class PlanError(ValueError):
    """A plan is malformed (the message names the key)."""


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def canonical(plan: dict) -> bytes:
    return json.dumps(_plain(plan), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def plan_id(plan: dict) -> str:
    """SHA-256 (hex) of the plan's canonical JSON: the study id every request carries."""
    return hashlib.sha256(canonical(plan)).hexdigest()


def study_plan(cfg: dict) -> dict:
    """The plan of a validated study configuration (``server.study_config.validate`` output)."""
    study = deepcopy(_plain(cfg))
    for key in _LOCAL_STUDY_KEYS:
        study.get("study", {}).pop(key, None)
    # rehearsal-only paths of [sites] (local / simulation runtimes) are not part of what a site approves
    study["sites"] = {name: ({"source": s["source"]} if isinstance(s, dict) and "source" in s else {})
                      for name, s in (study.get("sites") or {}).items()}
    if study.get("harmonization", {}).get("batch", 0) is None:  # batch = site: the plan as before the key
        study["harmonization"].pop("batch")
    for key, default in HARMONIZATION_OPTIONS.items():  # options at their default: the plan as before the key
        if key in study.get("harmonization", {}) and study["harmonization"][key] == default:
            study["harmonization"].pop(key)
    if study.get("selection", {}).get("allow", None) == []:  # nothing allowed: the plan as before the key
        study["selection"].pop("allow")
    if study.get("validation", {}).get("dca_horizon", 0) is None:  # no survival decision curve: the plan as
        study["validation"].pop("dca_horizon")                      # before the key existed (same id)
    if (study.get("coordinator") or {}).get("key") is None:  # no signing key named: the plan as before the key
        study.pop("coordinator", None)
    if study.get("study", {}).get("kind", "prediction") == "prediction":  # a prediction plan as before the
        study.get("study", {}).pop("kind", None)                          # association kind existed (same id)
        study.pop("association", None)
    return {"protocol": PROTOCOL, "task": "study", "study": study}


def harmonize_plan(request: dict, output: str = "harmonized") -> dict:
    """The plan of a federated ComBat (``fedrad harmonize --federated``): the request itself and its output name."""
    if not NAME.match(str(output)):
        raise PlanError(f"output name {output!r} must match {NAME.pattern}")
    return {"protocol": PROTOCOL, "task": "harmonize", "request": _plain(request), "output": str(output)}


def fit_plan(data: dict, *, rounds: int = 40, secure: bool = False, fedavg_rounds: int = 0,
             cv: dict | None = None) -> dict:
    """The plan of a federated model fit (``fedrad fit --federated``): model, features and outcome columns, and
    how many evaluation rounds a site answers for it (Newton steps; FedAvg rounds). ``cv`` (``k``, ``seed``,
    ``path_size``, ``path_decades``): the penalty is chosen by inner cross-validation on a path of that shape,
    so the site also answers the path's score tests, the inner folds' fits and their held-out losses."""
    keep = {k: data[k] for k in ("model", "features", "outcome", "time", "event") if k in data}
    plan = {"protocol": PROTOCOL, "task": "fit", "data": _plain(keep), "rounds": int(rounds),
            "secure": bool(secure), "fedavg_rounds": int(fedavg_rounds)}
    if cv is not None:  # left out without CV, so a fixed-penalty plan keeps its id
        plan["cv"] = {"k": int(cv["k"]), "seed": int(cv["seed"]), "path_size": int(cv["path_size"]),
                      "path_decades": float(cv["path_decades"])}
    return plan


def plan_of_document(doc: dict) -> dict:
    """The plan of a coordinator's plan file (``{"task": "study", "config": ...}`` / ``{"task": "harmonize",
    "request": ..., "output": ...}``) or a plan itself."""
    if doc.get("protocol") == PROTOCOL:
        return doc
    if doc.get("task") == "study":
        return study_plan(doc["config"])
    if doc.get("task") == "harmonize":
        return harmonize_plan(doc["request"], doc.get("output", "harmonized"))
    raise PlanError(f"not a fedrad plan (task {doc.get('task')!r})")


# --- what a study plan implies (shared by the coordinator's Study and the site's guard) ---------------------------
def is_association(study: dict) -> bool:
    """An association study (``[study] kind = "association"``): features x markers, no prediction model."""
    return study["study"].get("kind", "prediction") == "association"


def uses_loso(study: dict) -> bool:
    """The plan's leave-one-site-out folds: a prediction study with ``[validation] loso``."""
    return bool(study["validation"]["loso"]) and not is_association(study)


def dca_horizon(study: dict) -> float | None:
    """The survival decision curves' time horizon (``[validation] dca_horizon``), None without one (or for another
    endpoint): the sites take it from their approved plan, never from a request."""
    value = (study.get("validation") or {}).get("dca_horizon")
    if value is None or (study.get("endpoint") or {}).get("type") != "survival":
        return None
    return float(value)


def endpoint(study: dict) -> dict:
    """The plan's endpoint as a plain dict: its type and its outcome columns (:mod:`fedrad.common.endpoints`); an
    association study's "endpoint" is its markers."""
    if is_association(study):
        return endpoints.of({"type": "association", "markers": list(study["association"]["markers"])}).as_dict()
    return endpoints.of(study["endpoint"]).as_dict()


def outcome_columns(ep: dict) -> list[str]:
    """Response: the 0/1 outcome column; survival: the time and event columns."""
    return endpoints.of(ep).columns()


def grid_strong_to_weak(ep: dict, grid: list[float]) -> list[float]:
    """Penalty grid ordered from the strongest penalty (logistic: small C; Cox: large penalizer)."""
    return endpoints.of(ep).strongest_first(grid)


def fixed_grid(study: dict) -> list[float] | None:
    """The plan's fixed penalty grid in task order (strongest first), or None when the study uses the
    data-driven path (:func:`fedrad.common.selection.penalty_path`)."""
    grid = study["model"].get("grid")
    return None if grid is None else grid_strong_to_weak(endpoint(study), [float(g) for g in grid])


PATH_DECADES = {"l1": 3.0, "elasticnet": 3.0, "l2": 5.0}


def default_path_decades(penalty: str) -> float:
    """How many decades the penalty path spans when the plan does not say: 3 for L1 and the elastic net (from
    the all-zero point down to where most features are in, glmnet's range), 5 for L2, whose coefficients are
    never exactly zero: its path starts where an elastic net with L1 share 0.01 is all-zero and needs the extra
    decades to reach a practically unpenalized fit (on UCI heart the inner-CV optimum sits ~3.7 decades in)."""
    return PATH_DECADES.get(penalty, 3.0)


def path_shape(study: dict) -> tuple[int, float]:
    """``(path_size, path_decades)`` of the plan's penalty path."""
    model = study["model"]
    decades = model.get("path_decades")
    if decades is None:
        decades = default_path_decades(model.get("penalty", "l2"))
    return int(model.get("path_size", 12)), float(decades)


def penalty_count(study: dict) -> int:
    """How many penalty values each (fold, model) has: the grid's length or the path's size."""
    grid = fixed_grid(study)
    return len(grid) if grid is not None else path_shape(study)[0]


def path_step(study: dict) -> float:
    """Factor from one path value to the next in task order (logistic C grows, Cox's penalizer shrinks)."""
    size, decades = path_shape(study)
    step = 10.0 ** (decades / (size - 1))
    return step if endpoints.of(study["endpoint"]).larger_is_weaker else 1.0 / step


#: the batch a site's small scanner batches join (``<site>/other``)
OTHER_BATCH = "other"

#: ``[harmonization]`` options beyond neuroCombat's and their defaults (left out of a plan at their default, so a
#: plan written before the option keeps its id)
HARMONIZATION_OPTIONS = {"shared_batches": False, "covbat": False, "covbat_percent_var": 0.95, "covbat_n_pc": 0,
                         "smooth": {}, "smooth_alphas": None}


def batch_columns(harm: dict) -> list[str]:
    """The ComBat batch columns of a plan's ``[harmonization] batch``: none (batch = site), one, or several (nested
    ComBat, one pass per column in order)."""
    batch = harm.get("batch") if harm.get("enabled", True) else None
    return [] if not batch else [batch] if isinstance(batch, str) else list(batch)


def combat_passes(harm: dict, knots: dict | None = None) -> list[dict]:
    """The ComBat request options (:func:`combat_options`) of each pass: one pass, or with several batch columns
    nested ComBat (Horng et al., Sci Rep 2022), each pass on the previous one's output with the same covariates and
    smooth terms; CovBat, when asked, follows the last pass."""
    cols = batch_columns(harm)
    if len(cols) <= 1:
        return [combat_options(harm, knots)]
    return [{**combat_options({**harm, "batch": col}, knots), **({} if i == len(cols) - 1 else {"covbat": None})}
            for i, col in enumerate(cols)]


#: plan-fixed bins of a smooth covariate whose knots come from the sites' histograms (``smooth = {age = {knots = 3,
#: range = [18, 95]}}``): the range split into this many equal bins, merged at each site to >= k patients
SMOOTH_BINS = 32


def smooth_auto(harm: dict) -> dict:
    """The smooth terms whose knots the study derives from the sites' histograms: name -> (interior knot count,
    lower, upper)."""
    return {name: (int(spec["knots"]), float(spec["range"][0]), float(spec["range"][1]))
            for name, spec in (harm.get("smooth") or {}).items() if isinstance(spec, dict)}


def smooth_edges(lower: float, upper: float) -> list[float]:
    """The plan-fixed histogram edges of a smooth covariate's range."""
    return [float(v) for v in np.linspace(lower, upper, SMOOTH_BINS + 1)]


def check_auto_knots(knots, n_interior: int, lower: float, upper: float, degree: int = 3) -> bool:
    """Whether ``knots`` is a full cubic knot vector with the plan's boundaries and number of interior knots,
    strictly increasing inside the range (the study's knots from the sites' histograms, which no site can recompute
    alone; the spline-piece rule of ``combat.site_combat_stats`` bounds what any such knots can describe)."""
    try:
        t = [float(v) for v in knots]
    except (TypeError, ValueError):
        return False
    inner = t[degree + 1:len(t) - degree - 1]
    return (len(t) == 2 * (degree + 1) + n_interior and t[:degree + 1] == [lower] * (degree + 1)
            and t[-degree - 1:] == [upper] * (degree + 1) and all(lower < v < upper for v in inner)
            and all(a < b for a, b in zip(inner, inner[1:])))


def smooth_columns(harm: dict) -> list[str]:
    """The ComBat-GAM smooth covariates of a plan's ``[harmonization]`` (``smooth = {age = [...]}``)."""
    return list((harm.get("smooth") or {}) if harm.get("enabled", True) else {})


def combat_options(harm: dict, knots: dict | None = None) -> dict:
    """The ComBat request options (``fedrad.common.combat.make_request`` keywords) of a plan's ``[harmonization]``:
    the batch column, whether its labels are shared across sites, CovBat, smooth terms (``knots``: the full knot
    vectors of the terms the study derives from the sites' histograms)."""
    get = {**HARMONIZATION_OPTIONS, **harm}.get
    covbat = ({"percent_var": float(get("covbat_percent_var")), "n_pc": int(get("covbat_n_pc"))}
              if get("covbat") else None)
    from fedrad.common.smooth import full_knots

    smooth = {}
    for name, spec in (get("smooth") or {}).items():
        if isinstance(spec, dict):  # knots from the sites' histograms, known once the prepare round is in
            if knots is None or name not in knots:
                raise ValueError(f"the knots of smooth term {name!r} come from the sites' histograms; "
                                 "pass them (after the prepare round)")
            smooth[name] = [float(k) for k in knots[name]]
        else:
            smooth[name] = [float(k) for k in full_knots(spec[1:-1], spec[0], spec[-1])]
    return {"batch_col": harm.get("batch"), "shared_batches": bool(harm.get("batch") and get("shared_batches")),
            "covbat": covbat, "parametric": bool(harm["parametric"]), "mean_only": bool(harm["mean_only"]),
            "smooth": smooth or None, "smooth_alphas": get("smooth_alphas")}


def harmonization_method(harm: dict) -> str:
    """What the report says was used, e.g. "ComBat (parametric EB), batch = scanner shared across sites + CovBat
    (PCs explaining 95%)"."""
    if not harm.get("enabled", True):
        return "none"
    opts = combat_options(harm, {name: [] for name in smooth_auto(harm)})
    eb = "mean only" if opts["mean_only"] else ("parametric EB" if opts["parametric"] else "non-parametric EB")
    batch = ("batch = site" if not opts["batch_col"] else
             f"batch = {opts['batch_col']} " + ("(one batch per model across sites)" if opts["shared_batches"]
                                                else "within each site"))
    cols = batch_columns(harm)
    if len(cols) > 1:
        batch = "nested: " + ", then ".join(cols) + (" (labels shared across sites)" if opts["shared_batches"]
                                                      else " (each site's own labels)")
    text = f"ComBat ({eb}), {batch}"
    if harm.get("smooth"):
        def shown(spec):
            return (f"{spec['knots']} interior knots at the pooled quantiles of the sites' histograms over "
                    f"{spec['range'][0]:g}-{spec['range'][1]:g}" if isinstance(spec, dict)
                    else "knots " + ", ".join(f"{k:g}" for k in spec))
        text += ("; smooth " + ", ".join(f"{name} (cubic B-spline, {shown(spec)}; penalty by GCV per feature)"
                                         for name, spec in harm["smooth"].items()) + " (ComBat-GAM)")
    if opts["covbat"]:
        cb = opts["covbat"]
        text += " + CovBat (" + (f"first {cb['n_pc']} PCs" if cb["n_pc"] else
                                 f"PCs explaining {cb['percent_var']:.0%} of the variance") + ")"
    return text


def site_batch_labels(values, site: str, min_cell_size: int, shared: bool = False) -> list[str]:
    """A site's ComBat batch labels from its batch column (``[harmonization] batch``): ``<site>/<value>`` (batches are
    the site's own; a missing value is ``unknown``); the values with fewer than ``min_cell_size`` patients join
    ``<site>/other``, and when that is still under ``min_cell_size`` it joins the site's largest batch (a batch of
    fewer than k patients would let its ComBat sums describe them). The site and the pooled twin both use this.
    ``shared`` (``shared_batches``): a value is a batch across sites (one scanner model), so its label is the value
    itself; ``unknown`` and ``other`` stay the site's own."""
    import pandas as pd

    raw = ["unknown" if pd.isna(v) else str(v) for v in values]
    counts = pd.Series(raw).value_counts()
    small = {v for v, c in counts.items() if c < min_cell_size}
    labels = [OTHER_BATCH if v in small else v for v in raw]
    n_other = sum(1 for v in labels if v == OTHER_BATCH)
    kept = counts[[v not in small for v in counts.index]]
    if 0 < n_other < min_cell_size and len(kept):
        largest = sorted(kept.items(), key=lambda vc: (-vc[1], vc[0]))[0][0]
        labels = [largest if v == OTHER_BATCH else v for v in labels]
    if shared:
        return [f"{site}/{v}" if v in (OTHER_BATCH, "unknown") else v for v in labels]
    return [f"{site}/{v}" for v in labels]


#: a subgroup column has at most this many levels at a site (more: a continuous column, no subgroups)
MAX_SUBGROUP_LEVELS = 6


def subgroup_columns(study: dict) -> list[str]:
    """Columns whose levels define the subgroups of the validation metrics (TRIPOD+AI: performance across
    subgroups): the ComBat categorical covariates and the clinical columns, each used at a site only when it has at
    most :data:`MAX_SUBGROUP_LEVELS` levels there."""
    harm = study["harmonization"]
    return list(dict.fromkeys(list(harm["categorical"]) + list(study["model"]["clinical"])))


def prepare_spec(study: dict) -> dict:
    """What ``study_prepare`` needs, from the plan: endpoint, required and clinical columns, feature prefixes and
    the cohort table's columns."""
    ep = endpoint(study)
    harm, model = study["harmonization"], study["model"]
    clinical = list(model["clinical"])
    covariates = (list(harm["covariates"]) + smooth_columns(harm)) if harm["enabled"] else []
    batch = batch_columns(harm) if harm["enabled"] else []
    required = list(dict.fromkeys(clinical + covariates + outcome_columns(ep) + batch))
    return {"endpoint": ep, "required_columns": required, "clinical": clinical,
            "batch": (batch[0] if len(batch) == 1 else batch) if batch else None,
            "feature_prefixes": list(study["selection"].get("feature_prefixes") or []),
            "smooth_histograms": {name: smooth_edges(lo, hi) for name, (_, lo, hi) in smooth_auto(harm).items()}
            if harm["enabled"] else {},
            "cohort": {"columns": list(dict.fromkeys(clinical + list(harm["covariates"]) + smooth_columns(harm))),
                       "categorical": list(harm["categorical"])}}


#: columns never taken as features by default: pyradiomics' diagnostics (versions, hashes, image and mask
#: statistics) and a site label
DEFAULT_EXCLUDE = ("diagnostics_*", "site", "Site", "SITE", "center", "centre", "hospital")


def _matches(name: str, patterns) -> bool:
    from fnmatch import fnmatchcase

    return any(fnmatchcase(str(name), p) for p in patterns)


def named_columns(study: dict) -> set[str]:
    """Columns a study plan names in a role (outcome, time/event, clinical, covariates): never features."""
    spec = prepare_spec(study)
    return set(spec["required_columns"]) | set(spec["clinical"]) | set(spec["cohort"]["columns"])


def feature_rule(study: dict) -> dict:
    """The study's feature-column rule: every numeric column that is not identifying (nor identifier-like,
    :func:`feature_screen`), named by the plan, one of
    :data:`DEFAULT_EXCLUDE` or ``[selection] exclude`` (glob patterns), then filtered by ``feature_columns``
    (glob patterns) and ``feature_prefixes`` when given."""
    sel = study["selection"]
    return {"prefixes": list(sel.get("feature_prefixes") or []), "columns": list(sel.get("feature_columns") or []),
            "exclude": list(DEFAULT_EXCLUDE) + list(sel.get("exclude") or [])}


#: fedrad's pyradiomics feature names: ``<image type>_<class>_<feature>``, one pattern per image type (original,
#: LoG, one- and multi-level wavelets, the simple filters, LBP 2D and 3D): a site's default ``[columns] features``
PYRADIOMICS_PATTERNS = ("original_*", "wavelet-*", "wavelet[0-9]*-*", "log-sigma-*", "square_*", "squareroot_*",
                        "logarithm_*", "exponential_*", "gradient_*", "lbp-2D_*", "lbp-3D-*")


def site_volume(rows, study: dict, allowed: dict | None = None) -> str | None:
    """The plan's tumour-volume column at a site (:func:`volume_column`), unless the site's ``[columns] features``
    patterns leave it out."""
    vol = volume_column(rows, study["model"].get("volume"))
    if vol is not None and allowed is not None and "features" in allowed and not _matches(vol, allowed["features"]):
        return None
    return vol


def feature_screen(rows, study: dict, allowed: dict | None = None) -> dict:
    """A site's candidate features under a study plan (:func:`feature_rule`) and what the value rules saw:
    ``{"candidates": [...], "dates": [...], "near_unique": [...]}`` (column names in the table's order; dates:
    left out, every value a ``yyyymmdd`` integer; near-unique: integer record-number-like candidates, kept).

    Never candidates: endpoint-like names (:func:`fedrad.common.names.endpoint_like`: a second endpoint's or a
    follow-up column) unless ``[selection] allow`` or an exact ``feature_columns`` entry names them (listed in
    ``endpoint_like``), identifier-like names (:func:`fedrad.common.names.identifier_like`), names with a control
    character, non-ASCII names the site's ``allowed`` (its ``[columns]`` allow-list) does not name exactly in
    ``features``, and integer columns holding only ``yyyymmdd`` dates. With ``allowed`` only the columns matching
    its ``features`` patterns are candidates (without the key: :data:`PYRADIOMICS_PATTERNS` and the plan's volume
    column). Dtypes come from ``rows.dtypes`` and the values from one block: no per-column access."""
    import pandas as pd

    from fedrad.common.names import endpoint_like, identifier_like, is_ascii, unsafe_character, value_flags

    named = named_columns(study)
    rule = feature_rule(study)
    # endpoint-like names are features only when the study names them: [selection] allow, or an exact
    # (pattern-free) entry of feature_columns
    named_features = set(study["selection"].get("allow") or []) | {
        c for c in rule["columns"] if not any(ch in str(c) for ch in "*?[")}
    endpoint_names: list = []
    site_patterns, exact, volume = None, set(), None
    if allowed is not None:
        site_patterns = list(allowed.get("features", PYRADIOMICS_PATTERNS))
        exact = set(allowed.get("features", []))
        if "features" not in allowed:
            volume = volume_column(rows, study["model"].get("volume"))
    keep = []
    for j, (c, dtype) in enumerate(zip(rows.columns, rows.dtypes)):
        if c in named or c in IDENTIFYING_COLUMNS or _matches(c, rule["exclude"]):
            continue
        if not pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype):
            continue
        if rule["prefixes"] and not any(str(c).startswith(p) for p in rule["prefixes"]):
            continue
        if rule["columns"] and not _matches(c, rule["columns"]):
            continue
        if identifier_like(c) or unsafe_character(c) is not None or (not is_ascii(c) and str(c) not in exact):
            continue
        if endpoint_like(c) and str(c) not in named_features:
            endpoint_names.append(c)
            continue
        if site_patterns is not None and not (_matches(c, site_patterns) or (volume is not None and c == volume)):
            continue
        keep.append(j)
    ends = [str(c) for c in endpoint_names]
    if not keep:
        return {"candidates": [], "dates": [], "near_unique": [], "endpoint_like": ends}
    date_like, near = value_flags(rows.iloc[:, keep].to_numpy(dtype=float, na_value=np.nan))
    names = [rows.columns[j] for j in keep]
    return {"candidates": [c for c, d in zip(names, date_like) if not d],
            "dates": [c for c, d in zip(names, date_like) if d],
            "near_unique": [c for c, d, u in zip(names, date_like, near) if u and not d], "endpoint_like": ends}


def candidate_features(rows, study: dict, allowed: dict | None = None) -> list[str]:
    """A site's candidate features under a study plan and its ``[columns]`` allow-list (:func:`feature_screen`), in
    the table's column order."""
    return feature_screen(rows, study, allowed)["candidates"]


def unmatched_numeric(rows, study: dict, limit: int = 5, allowed: dict | None = None) -> dict:
    """How many numeric, non-named columns a table has and a few of those the feature rule left out (column names
    only: what a study that matches no features must tell its coordinator)."""
    import pandas as pd

    named = named_columns(study)
    numeric = [c for c, dtype in zip(rows.columns, rows.dtypes) if c not in named and c not in IDENTIFYING_COLUMNS
               and pd.api.types.is_numeric_dtype(dtype)]
    chosen = set(candidate_features(rows, study, allowed))
    left = [str(c) for c in numeric if c not in chosen]
    return {"n_numeric": len(numeric), "n_columns": int(len(rows.columns)), "left_out": left[:limit]}


#: tumour-volume columns of common extractors, most preferred first (matched case-insensitively): pyradiomics 3
#: (voxel and mesh volume), pyradiomics 1.x-2.x, MIRP, LIFEx, IBSI feature codes, CaPTk, generic tables
VOLUME_NAMES = ("original_shape_voxelvolume", "original_shape_meshvolume", "original_shape_volume",
                "morph_volume", "morph_vol_approx", "shape_volume(ml)", "shape_volume(vx)", "shape_volume_ml",
                "f_morph.vol", "fmorph.vol", "morph.vol", "shape_volume", "volume", "tumor_volume",
                "tumour_volume", "gtv_volume", "volume_ml", "volume_cc")
#: name endings that also denote a volume (any image type prefix, e.g. ``wavelet-LLH_shape_VoxelVolume``)
VOLUME_SUFFIXES = ("_shape_voxelvolume", "_shape_meshvolume", "_shape_volume", "_volumetric_volume",
                   "_morph_volume", "_volume")


def volume_column(rows, declared: str | None = None) -> str | None:
    """The table's tumour-volume column: ``declared`` (``[model] volume``) when present, else the first known name
    (:data:`VOLUME_NAMES`, then :data:`VOLUME_SUFFIXES`; case-insensitive), numeric columns only."""
    import pandas as pd

    numeric = [c for c, dtype in zip(rows.columns, rows.dtypes)
               if pd.api.types.is_numeric_dtype(dtype) and c not in IDENTIFYING_COLUMNS]
    if declared:
        return declared if declared in numeric else None
    lower = {str(c).lower(): c for c in numeric}
    for name in VOLUME_NAMES:
        if name in lower:
            return lower[name]
    for suffix in VOLUME_SUFFIXES:
        for low, col in lower.items():
            if low.endswith(suffix):
                return col
    return None


def plan_columns(plan: dict) -> dict[str, list[str]]:
    """The named (non-feature) columns a plan uses, by role: what a site operator approves."""
    task = plan["task"]
    if task == "study":
        study = plan["study"]
        ep = endpoint(study)
        harm = study["harmonization"]
        return {"outcome": outcome_columns(ep), "clinical": list(study["model"]["clinical"]),
                "covariates": (list(harm["covariates"]) + smooth_columns(harm)
                               + batch_columns(harm))
                if harm["enabled"] else [],
                "categorical": list(harm["categorical"]) if harm["enabled"] else []}
    if task == "harmonize":
        req = plan["request"]
        return {"outcome": [], "clinical": [], "covariates": list(req["continuous"]) + list(req["categorical"])
                + list(req.get("smooth") or {}),
                "categorical": list(req["categorical"]), "features": list(req["features"])}
    data = plan["data"]
    return {"outcome": endpoints.of_data(data).columns(), "clinical": [], "covariates": [], "categorical": [],
            "features": list(data["features"])}


def inner_fold_usable(n_train: int, n_test: int, min_cell_size: int) -> bool:
    """The fold rule: an inner cross-validation fold is used at a site only when both the rows it trains on and
    the rows it leaves out number at least the site's minimum cell size (so neither a sum over the training
    subset nor its difference from the all-rows sum describes fewer than k patients)."""
    return n_train >= min_cell_size and n_test >= min_cell_size
