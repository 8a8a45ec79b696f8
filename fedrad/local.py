"""Single-machine runs of the federated protocols: each site's rows in its own table, Flower's message layer
in-process (:class:`~fedrad.server.federation.LocalGrid` with the real site ClientApp), the coordinator's code
unchanged. Used by ``fedrad harmonize --federated`` and ``fedrad fit --federated`` on a table a user already has,
and by tests. Only this module and the CLI see both client and server.
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedrad.client.policy import DEFAULT_MIN_CELL_SIZE
from fedrad.server.federation import Federation, LocalGrid, SiteError

ROW_COL = "__fedrad_row__"
#: pyradiomics feature names: <image type>_<class>_<feature>
RADIOMIC_NAME = re.compile(r"^[A-Za-z0-9.\-]+_(shape|shape2D|firstorder|glcm|glrlm|glszm|gldm|ngtdm)_\w+$")


def default_features(df: pd.DataFrame, exclude: set[str]) -> list[str]:
    """pyradiomics-named columns when there are any, else every numeric column not excluded."""
    radiomic = [c for c in df.columns if RADIOMIC_NAME.match(str(c)) and c not in exclude]
    if radiomic:
        return radiomic
    return [c for c in df.columns if c not in exclude and c != ROW_COL and pd.api.types.is_numeric_dtype(df[c])]


@dataclass
class LocalSites:
    """Sites made from one table split by a column; each site's rows live in its own file."""

    workdir: Path
    tables: dict[str, Path]
    min_cell_size: int

    def node_configs(self) -> list[dict]:
        return [{"site-name": s, "table": str(p), "workdir": str(self.workdir / s),
                 "min-cell-size": self.min_cell_size} for s, p in self.tables.items()]

    def federation(self, log=None, plan: dict | None = None) -> Federation:
        """The sites behind Flower's in-process message layer; with ``plan``, each site's operator (the user of
        this one machine) approves it first and every request carries its id."""
        from fedrad.client.client_app import app as client_app

        fed = Federation(LocalGrid(client_app, self.node_configs()), log=log)
        if plan is not None:
            fed.plan_id = approve_at_sites(plan, self.node_configs())
        return fed

    def harmonized(self, name: str = "harmonized") -> dict[str, pd.DataFrame]:
        return {s: pd.read_parquet(self.workdir / s / "harmonized" / f"{name}.parquet") for s in self.tables}


def approve_at_sites(plan: dict, node_configs: list[dict]) -> str:
    """Approve ``plan`` at every site of ``node_configs`` (what each site's operator does with ``fedrad site
    approve``; on one machine the same person runs every site). Returns the plan id."""
    from fedrad.client.approval import approve_plan
    from fedrad.client.site import Site

    pid = None
    for cfg in node_configs:
        site = Site.from_node_config(cfg)
        pid = approve_plan(site.workdir, plan, allowed_columns=site.columns)
    return pid


def approve_plan_file_at_sites(plan_path: Path, node_configs: list[dict]) -> str:
    """Approve a coordinator plan file (what ``flwr run`` will submit) at every local site: loopback rehearsals,
    the demo and tests, where one person is every site's operator (``fedrad site approve`` elsewhere)."""
    import json as _json

    from fedrad.common.plan import plan_of_document

    return approve_at_sites(plan_of_document(_json.loads(Path(plan_path).read_text())), node_configs)


def with_local_reasons(node_configs: list[dict], run):
    """Run ``run()``; a :class:`SiteError` gets each failing site's detailed reason from its local log appended.
    Only for single-machine runs, where the person running every site also reads every site's log; over the
    network a site's reply carries its error code and a generic text only (fedrad.client.site)."""
    from fedrad.client.site import Site
    from fedrad.server.federation import SiteError

    try:
        return run()
    except SiteError as exc:
        workdirs = {}
        for cfg in node_configs:
            try:
                site = Site.from_node_config(cfg)
                workdirs[site.name] = site.workdir
            except Exception:
                continue
        failures = {}
        for name, reason in exc.failures.items():
            log = workdirs.get(name, Path("/nonexistent")) / "site.log"
            last = log.read_text().strip().splitlines()[-1] if log.is_file() and log.stat().st_size else ""
            detail = last.split("] ", 1)[1] if "] " in last else ""
            failures[name] = f"{reason} -- site log: {detail}" if detail else reason
        raise SiteError(exc.request, failures) from exc


REHEARSAL_KEYS = ("table", "manifest", "params", "robustness")


def rehearsal_nodes(cfg: dict, root: Path) -> list[dict]:
    """Node configs of a single-machine rehearsal from study.toml's ``[sites]`` (each entry's data on this machine:
    table or manifest + params, robustness), with work directories under ``root``. Sites read these from their
    own configuration, never from a request; the plan they approve does not contain them."""
    nodes = []
    for name, src in cfg["sites"].items():
        node = {"site-name": name, "workdir": str(Path(root) / name)}
        node.update({k: str(src[k]) for k in REHEARSAL_KEYS if src.get(k)})
        nodes.append(node)
    return nodes


def write_simulation_sites(cfg: dict, sim_root: Path) -> None:
    """For Flower's simulation engine (virtual sites ``site1..siteN`` under ``sim_root``): each virtual site's
    ``site.toml`` with its data from ``[sites]`` (in order), and the study plan approved in its work directory."""
    import json as _json

    from fedrad.common.plan import study_plan

    nodes = []
    for i, src in enumerate(cfg["sites"].values()):
        name = f"site{i + 1}"
        d = Path(sim_root) / name
        d.mkdir(parents=True, exist_ok=True)
        lines = ["[site]", f"name = {_json.dumps(name)}"]
        lines += [f"{k} = {_json.dumps(str(src[k]))}" for k in REHEARSAL_KEYS if src.get(k)]
        (d / "site.toml").write_text("\n".join(lines) + "\n")
        nodes.append({"site-name": name, "workdir": str(d), "config": str(d / "site.toml")})
    approve_at_sites(study_plan(cfg), nodes)


def split_into_sites(df: pd.DataFrame, site_col: str, workdir: Path | None = None,
                     min_cell_size: int = DEFAULT_MIN_CELL_SIZE) -> LocalSites:
    if site_col not in df.columns:
        raise ValueError(f"column {site_col!r} not in the table; columns: {', '.join(map(str, df.columns[:12]))}")
    if df[site_col].isna().any():
        raise ValueError(f"column {site_col!r} has {int(df[site_col].isna().sum())} missing values; "
                         "every row needs a site")
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fedrad-local-"))
    tables = {}
    rows = df.assign(**{ROW_COL: np.arange(len(df))})
    for site, part in rows.groupby(site_col, sort=True):
        name = str(site)
        d = workdir / name
        d.mkdir(parents=True, exist_ok=True)
        part.to_parquet(d / "table.parquet", index=False)
        tables[name] = d / "table.parquet"
    return LocalSites(workdir=workdir, tables=tables, min_cell_size=min_cell_size)


def harmonize_nested(df: pd.DataFrame, batch_cols: list[str], features: list[str] | None = None,
                     covariates: list[str] = (), categorical: list[str] = (), **options) -> tuple[pd.DataFrame, dict]:
    """Nested ComBat (Horng et al., Sci Rep 2022): ComBat over several batch columns in sequence (e.g. manufacturer,
    then kernel), each pass on the previous pass's output, with the same covariates and options
    (:func:`harmonize_table`; federated: 2 round trips per column). The order is the caller's: Horng et al.
    choose it by how many features still differ between batches, which a user can compare with the returned
    per-pass references. Returns the harmonized table and ``{"passes": [info, ...]}``."""
    if not batch_cols:
        raise ValueError("nested ComBat needs at least one batch column")
    dup = sorted({c for c in batch_cols if list(batch_cols).count(c) > 1})
    if dup:
        raise ValueError(f"batch column(s) {dup} listed more than once")
    excluded = {c for c in batch_cols}
    if features is None:
        features = default_features(df, excluded | set(covariates) | set(categorical)
                                    | set(options.get("smooth") or {}) | {options.get("site_col")} - {None})
    out, passes = df, []
    for col in batch_cols:
        out, info = harmonize_table(out, col, features, covariates, categorical, **options)
        passes.append({"batch_col": col, **info})
    return out, {"mode": passes[-1]["mode"], "passes": passes, "reference": passes[-1]["reference"],
                 "round_trips": sum(p.get("round_trips", 0) for p in passes)}


def harmonize_table(df: pd.DataFrame, batch_col: str, features: list[str] | None = None,
                    covariates: list[str] = (), categorical: list[str] = (), *, ref_batch=None, eb: bool = True,
                    parametric: bool = True, mean_only: bool = False, federated: bool = False,
                    min_cell_size: int | None = None, log=None, workdir: Path | None = None,
                    site_col: str | None = None, covbat=None, smooth: dict | None = None,
                    smooth_alphas=None) -> tuple[pd.DataFrame, dict]:
    """ComBat on a table: pooled, or federated with each batch value as a site. Same columns and row order.

    ``site_col``: the sites are this column's values and ``batch_col`` (e.g. the scanner model) is shared across
    them (one batch per model); ``covbat``: CovBat after ComBat; ``smooth``: ComBat-GAM smooth terms (covariate →
    full knot vector).

    ``workdir`` keeps the sites' folders (tables, audit logs, harmonized outputs) for inspection; by default
    they live in a temporary directory removed afterwards.
    """
    from fedrad.common.combat import ComBat, make_request

    smooth = dict(smooth or {})
    for col in [batch_col, *covariates, *categorical, *smooth, *([site_col] if site_col else [])]:
        if col not in df.columns:
            raise ValueError(f"column {col!r} not in the table")
    covariates = list(dict.fromkeys([*covariates, *categorical]))
    if features is None:
        features = default_features(df, {batch_col, *covariates, *smooth, *([site_col] if site_col else [])})
    missing = [f for f in features if f not in df.columns]
    if missing:
        raise ValueError(f"feature column(s) not in the table: {', '.join(missing[:5])}")
    if not features:
        raise ValueError("no feature columns to harmonize; pass --features")
    if not federated:
        model = ComBat(covariates=covariates, categorical=list(categorical), eb=eb, parametric=parametric,
                       mean_only=mean_only, ref_batch=ref_batch, min_cell_size=min_cell_size or 2, covbat=covbat,
                       smooth=smooth or None, smooth_alphas=smooth_alphas)
        covs = covariates + list(smooth)
        out = model.fit_transform(df[features], df[batch_col], df[covs] if covs else None)
        result = df.copy()
        result[features] = np.asarray(out, dtype=float)
        return result, {"mode": "pooled", "excluded": getattr(model, "excluded_features_", {}),
                        "reference": model.reference_.to_dict()}
    from fedrad.server.harmonize import run_federated_combat

    request = make_request(features, covariates, list(categorical), ref_batch=ref_batch, eb=eb,
                           parametric=parametric, mean_only=mean_only,
                           min_cell_size=min_cell_size or DEFAULT_MIN_CELL_SIZE,
                           batch_col=batch_col if site_col else None, shared_batches=bool(site_col),
                           covbat=covbat, smooth=smooth or None, smooth_alphas=smooth_alphas)
    with tempfile.TemporaryDirectory(prefix="fedrad-local-") as tmp:
        sites = split_into_sites(df, site_col or batch_col, Path(tmp) if workdir is None else Path(workdir),
                                 min_cell_size=min_cell_size or DEFAULT_MIN_CELL_SIZE)
        from fedrad.common.plan import harmonize_plan
        fed = sites.federation(log=log, plan=harmonize_plan(request, "harmonized"))
        reference, summaries = with_local_reasons(sites.node_configs(), lambda: run_federated_combat(fed, request))
        parts = pd.concat(list(sites.harmonized().values()), ignore_index=True).sort_values(ROW_COL)
    result = df.copy()
    result[features] = parts[features].to_numpy(dtype=float)
    return result, {"mode": "federated", "round_trips": fed.rounds, "reference": reference.to_dict(),
                    "summaries": summaries}


def select_features(df: pd.DataFrame, features: list[str] | None, prefixes: list[str] | None,
                    exclude: set[str]) -> list[str]:
    """Explicit ``features``, else columns starting with any of ``prefixes``, else pyradiomics-named columns."""
    if features:
        missing = [f for f in features if f not in df.columns]
        if missing:
            raise ValueError(f"feature column(s) not in the table: {', '.join(missing[:5])}")
        chosen = list(features)
    elif prefixes:
        chosen = [c for c in df.columns if any(str(c).startswith(p) for p in prefixes) and c not in exclude]
    else:
        chosen = default_features(df, exclude)
    if not chosen:
        raise ValueError("no feature columns selected; pass --features or --feature-prefix")
    text = [c for c in chosen if not pd.api.types.is_numeric_dtype(df[c])]
    if text:
        raise ValueError(f"feature column {text[0]!r} is not numeric; encode it (e.g. one-hot) first")
    return chosen


CASE_COL = "case_id"


def with_case_ids(df: pd.DataFrame, site_col: str) -> pd.DataFrame:
    """The table with a ``case_id`` column: its own, else ``<site>-<row number within the site>`` (what a study
    gives rows without one, :func:`fedrad.common.pipeline.complete_rows`), so a row's inner-CV fold
    (:mod:`fedrad.common.folds`) is the same pooled, federated and in a study of the same sites."""
    if CASE_COL in df.columns:
        if df[CASE_COL].isna().any():
            raise ValueError(f"column {CASE_COL!r} has {int(df[CASE_COL].isna().sum())} missing values; every row "
                             "needs a case id (inner cross-validation folds are assigned by it)")
        return df
    order = df.groupby(site_col, sort=False).cumcount()
    return df.assign(**{CASE_COL: df[site_col].astype(str) + "-" + order.astype(str)})


def fit_table(df: pd.DataFrame, site_col: str, model: str, features: list[str], *, outcome: str | None = None,
              time: str | None = None, event: str | None = None, penalty: str | None = "l2",
              C: float | None = None, l1_ratio: float | None = None, federated: bool = False,
              min_cell_size: int | None = None, log=None, secure_aggregation: bool = False,
              workdir: Path | None = None, cv: dict | None = None) -> tuple[object, dict]:
    """Fit a logistic, site-stratified Cox or linear model on a table, pooled or federated (each site a site
    agent).

    ``C`` fixes the penalty (logistic C, Cox penalizer, linear alpha). Without it the penalty is chosen as a study
    chooses it (:mod:`fedrad.common.penalty_cv`): the data-driven path from the gradient at zero, k-fold inner
    cross-validation by case id with the sites' minimum-cell rule for inner folds, the smallest summed held-out
    loss; ``cv`` overrides the study's defaults (``k``, ``seed``, ``path_size``, ``path_decades``). Pooled and
    federated choose the same value. A model without a penalty (``penalty`` None) has nothing to choose.
    ``info["penalty_choice"]`` says how the penalty was set (``method`` "cv" or "fixed").

    ``secure_aggregation`` (federated logistic only, >= 3 sites): every round's sums are combined with Flower's
    SecAgg+, so the coordinator only learns their total over all sites (fedrad.server.secure; docs/PRIVACY.md);
    it needs a fixed ``C`` (the inner CV's held-out losses are not secure-aggregated).
    ``workdir`` keeps the sites' folders (tables, audit logs); by default a temporary directory.
    """
    if secure_aggregation and (model != "logistic" or not federated):
        raise ValueError("secure aggregation is available for the federated logistic fit only "
                         "(--model logistic --federated)")
    if site_col not in df.columns:
        raise ValueError(f"column {site_col!r} not in the table")
    outcome_cols = [time, event] if model == "cox" else [outcome]
    if any(c is None for c in outcome_cols):
        raise ValueError(f"{model} needs --outcome" if model != "cox" else "cox needs --time and --event")
    for col in outcome_cols:
        if col not in df.columns:
            raise ValueError(f"outcome column {col!r} not in the table")
    if model not in ("logistic", "cox", "linear"):
        raise ValueError(f"unknown model {model!r}; use logistic, cox or linear")
    if penalty is None:  # nothing to choose: an unpenalized fit (Cox: penalizer 0)
        C = 0.0 if model == "cox" else (1.0 if C is None else C)
    if C is None and secure_aggregation:
        from fedrad.common.privacy import digit_bits

        digit_bits(df[site_col].nunique())  # >= 3 sites: that error first, as for a fixed penalty
        raise ValueError("--secure-aggregation needs a fixed --C: the inner cross-validation that chooses the "
                         "penalty sends held-out losses that secure aggregation does not cover")
    if C is not None:
        return _fit_fixed(df, site_col, model, features, outcome=outcome, time=time, event=event, penalty=penalty,
                          C=C, l1_ratio=l1_ratio, federated=federated, min_cell_size=min_cell_size, log=log,
                          secure_aggregation=secure_aggregation, workdir=workdir)
    from fedrad.common.penalty_cv import cv_settings

    settings = cv_settings(penalty=penalty, **(cv or {}))
    data = _fit_data(model, features, outcome, time, event)
    rho = l1_ratio if penalty == "elasticnet" else None
    k_min = min_cell_size or DEFAULT_MIN_CELL_SIZE
    df = with_case_ids(df, site_col)
    if not federated:
        from fedrad.common import endpoints
        from fedrad.common.penalty_cv import pooled_cv_fit

        fitted, choice = pooled_cv_fit(df, site_col, endpoints.of_data(data).as_dict(), features, penalty, rho,
                                       settings, k_min)
        return fitted, {"mode": "pooled", "penalty_choice": choice}
    from fedrad.server.fitting import federated_cv_fit

    with tempfile.TemporaryDirectory(prefix="fedrad-local-") as tmp:
        sites = split_into_sites(df, site_col, Path(workdir or tmp), min_cell_size=k_min)
        from fedrad.common.plan import fit_plan
        fed = sites.federation(log=log, plan=fit_plan(data, rounds=200, cv=settings))
        fitted, choice = with_local_reasons(sites.node_configs(),
                                            lambda: federated_cv_fit(fed, data, penalty, rho, settings))
    return fitted, {"mode": "federated", "round_trips": fed.rounds, "penalty_choice": choice}


def _fit_data(model: str, features: list[str], outcome, time, event) -> dict:
    """The site data spec of a fit (model, features, outcome columns)."""
    if model == "cox":
        return {"model": "cox", "features": features, "time": time, "event": event}
    return {"model": model, "features": features, "outcome": outcome}


def _fit_fixed(df: pd.DataFrame, site_col: str, model: str, features: list[str], *, outcome, time, event,
               penalty, C: float, l1_ratio, federated: bool, min_cell_size, log, secure_aggregation: bool,
               workdir) -> tuple[object, dict]:
    """:func:`fit_table` at a fixed penalty ``C``."""
    fixed = {"method": "fixed", "value": float(C)}
    data = _fit_data(model, features, outcome, time, event)
    if model == "logistic":
        from fedrad.common.glm import LogisticModel, LogisticServer

        if not federated:
            est = LogisticModel(penalty=penalty, C=C, l1_ratio=l1_ratio)
            return est.fit(df[features], df[outcome].to_numpy()), {"mode": "pooled", "penalty_choice": fixed}
        server = LogisticServer(features, penalty=penalty, C=C, l1_ratio=l1_ratio)
    elif model == "cox":
        from fedrad.common.cox import CoxFit, fit_pooled

        if not federated:
            fitted = fit_pooled(df, time, event, strata=site_col, features=features, penalizer=C,
                                l1_ratio=l1_ratio or 0.0)
            return fitted, {"mode": "pooled", "penalty_choice": fixed}
        server = CoxFit(features, duration_col=time, event_col=event, penalizer=C, l1_ratio=l1_ratio or 0.0)
    else:
        from fedrad.common.linear import LinearModel, LinearServer

        if not federated:
            est = LinearModel(penalty=penalty, alpha=C, l1_ratio=l1_ratio)
            return (est.fit(df[features], df[outcome].to_numpy(dtype=float)),
                    {"mode": "pooled", "penalty_choice": fixed})
        server = LinearServer(features, penalty=penalty, alpha=C, l1_ratio=l1_ratio)
    from fedrad.server.fitting import FitTask, run_fits

    if secure_aggregation:
        from fedrad.common.privacy import digit_bits

        digit_bits(df[site_col].nunique())  # >= 3 sites, before any site is asked
    with tempfile.TemporaryDirectory(prefix="fedrad-local-") as tmp:
        sites = split_into_sites(df, site_col, Path(workdir or tmp),
                                 min_cell_size=min_cell_size or DEFAULT_MIN_CELL_SIZE)
        from fedrad.common.plan import fit_plan
        fed = sites.federation(log=log, plan=fit_plan(data, rounds=200, secure=secure_aggregation))
        if secure_aggregation:
            from fedrad.server.secure import secure_logistic_fit

            fitted, info = with_local_reasons(sites.node_configs(), lambda: secure_logistic_fit(
                fed, features, data, penalty=penalty, C=C, l1_ratio=l1_ratio))
            return fitted, {**info, "penalty_choice": fixed}
        models = with_local_reasons(sites.node_configs(), lambda: run_fits(fed, {"fit": FitTask(server, data)}))
    return models["fit"], {"mode": "federated", "round_trips": fed.rounds, "penalty_choice": fixed}


def rehearsal_signer(cfg: dict, signer=None):
    """``(cfg, signer)`` for a one-machine rehearsal of a plan that names a coordinator key: without the
    coordinator's own key (``signer``), a key made for this run replaces the plan's (the rehearsal's sites approve
    that plan, so every request is still signed and checked). Plans without a key: unchanged, no signer."""
    if not (cfg.get("coordinator") or {}).get("key"):
        return cfg, signer
    if signer is None or signer.public != cfg["coordinator"]["key"]:
        from fedrad.common.signing import Signer

        signer = Signer.generate()
        cfg = {**cfg, "coordinator": {**cfg["coordinator"], "key": signer.public}}
    return cfg, signer


def run_study_in_process(cfg: dict, node_configs: list[dict], log=None, signer=None) -> dict:
    """Run a validated study with every site in this process (Flower's message layer, LocalGrid). A plan that
    names a coordinator key is signed (:func:`rehearsal_signer`)."""
    from fedrad.client.client_app import app as client_app
    from fedrad.common.plan import study_plan
    from fedrad.server.study import make_study

    cfg, signer = rehearsal_signer(cfg, signer)
    approve_at_sites(study_plan(cfg), node_configs)
    fed = RehearsalFederation(LocalGrid(client_app, node_configs), node_configs, log=log, signer=signer)
    try:
        return with_local_reasons(node_configs, lambda: make_study(fed, cfg).run())
    except SiteError as exc:
        exc.plan_id = fed.plan_id  # the plan the sites refused, for the message that names it
        raise


class RehearsalFederation(Federation):
    """A federation of sites on this machine: every site failure carries the site's own reason from its local
    log (:func:`with_local_reasons`), also when the study drops the site and goes on without it. One person
    runs every site of a rehearsal, so the reason that stays in a site's log over the network is theirs to see."""

    def __init__(self, grid, node_configs: list[dict], **kwargs):
        super().__init__(grid, **kwargs)
        self.node_configs = node_configs

    def ask(self, request: str, payload: dict | None = None, **kwargs) -> dict[str, dict]:
        return with_local_reasons(self.node_configs, lambda: Federation.ask(self, request, payload, **kwargs))


#: the public texts of a site's failure that mean its data or its configuration, not the protocol, failed
def _data_texts() -> tuple[str, ...]:
    from fedrad.client.site import PUBLIC_ERRORS

    return PUBLIC_ERRORS["data"], PUBLIC_ERRORS["config"]


def data_failures(missing: dict[str, str]) -> dict[str, str]:
    """Of a study's missing sites (``results["missing_sites"]``), those dropped for an error in their data or
    configuration, with the site log's reason when the failure carries it."""
    texts = _data_texts()
    out = {}
    for site, reason in (missing or {}).items():
        if any(str(reason).startswith(t) for t in texts):
            out[site] = str(reason).split(" -- site log: ", 1)[-1]
    return out


def fit_fedavg(df: pd.DataFrame, site_col: str, features: list[str], outcome: str, *, C: float = 1.0,
               strategy: str = "fedavg", rounds: int = 20, epochs: int = 20, lr: float = 0.5, mu: float = 0.1,
               min_cell_size: int | None = None, log=None, dp_noise: float = 0.0, dp_clip: float = 1.0,
               dp_delta: float = 1e-5, dp_epsilon: float | None = None, workdir: Path | None = None):
    """Approximate logistic fit with Flower's own FedAvg / FedProx strategies (see fedrad.common.fedavg).

    One exact round gives the global standardization; then ``rounds`` strategy rounds. Returns a
    LogisticModel (L2 penalty ``C``) and info with the round count and the gap to the exact federated fit.

    Differential privacy (docs/PRIVACY.md): ``dp_noise`` > 0 (noise multiplier z), or ``dp_epsilon`` (the z that
    spends exactly that ε at ``dp_delta`` over ``rounds``), runs Flower's DifferentialPrivacyClientSideFixedClipping:
    sites clip their update to L2 norm ``dp_clip`` (fixedclipping_mod), sites weigh equally, the coordinator
    adds N(0, (z·dp_clip/k)²) to the average each round. ``info["dp"]`` reports (ε, δ) of the weight updates.
    ``workdir`` keeps the sites' folders (tables, audit logs); by default a temporary directory.
    """
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg, FedProx

    from fedrad.common.glm import LogisticModel, LogisticServer, combine_logistic_stats

    if strategy not in ("fedavg", "fedprox"):
        raise ValueError(f"strategy {strategy!r}: use fedavg or fedprox")
    with tempfile.TemporaryDirectory(prefix="fedrad-local-") as tmp:
        sites = split_into_sites(df, site_col, Path(workdir or tmp),
                                 min_cell_size=min_cell_size or DEFAULT_MIN_CELL_SIZE)
        data = {"model": "logistic", "features": features, "outcome": outcome}
        from fedrad.common.plan import fit_plan
        plan = fit_plan(data, rounds=2, fedavg_rounds=int(rounds))
        fed = sites.federation(log=log, plan=plan)
        server = LogisticServer(features, penalty="l2", C=C)
        replies = fed.ask("fit_round", {"tasks": [{"id": "stats", "request": server.start(), "data": data,
                                                  "sites": None}]}, phase="standardization")
        stats = combine_logistic_stats([r["results"]["stats"] for r in replies.values()], features)
        mean, scale = stats["mean"], np.where(stats["scale"] > 0, stats["scale"], 1.0)
        n_sites = len(sites.tables)
        cls = FedProx if strategy == "fedprox" else FedAvg
        kwargs = {"proximal_mu": mu} if strategy == "fedprox" else {}
        private = bool(dp_noise and dp_noise > 0) or dp_epsilon is not None
        if private:
            from fedrad.common.privacy import noise_multiplier_for
            from fedrad.server.secure import dp_strategy

            if dp_epsilon is not None:
                dp_noise = noise_multiplier_for(float(dp_epsilon), float(dp_delta), int(rounds))
            strat = dp_strategy(strategy, n_sites, noise_multiplier=float(dp_noise), clipping_norm=float(dp_clip),
                                delta=float(dp_delta), mu=mu)
        else:
            strat = cls(fraction_evaluate=0.0, min_train_nodes=n_sites, min_available_nodes=n_sites, **kwargs)
        config = ConfigRecord({"features": list(features), "mean": [float(v) for v in mean],
                               "scale": [float(v) for v in scale], "outcome": outcome, "C": float(C),
                               "epochs": int(epochs), "lr": float(lr), "proximal-mu": float(mu if kwargs else 0.0),
                               "plan": fed.plan_id,
                               **({"uniform-weight": True} if private else {})})
        init = ArrayRecord({"weights": Array(np.zeros(len(features) + 1))})
        result = strat.start(grid=fed.grid, initial_arrays=init, num_rounds=int(rounds), train_config=config)
        w = result.arrays["weights"].numpy()
        dp = None
        if private:
            spent = strat.privacy_spent()
            dp = {"noise_multiplier": float(dp_noise), "clipping_norm": float(dp_clip), "epsilon": spent.epsilon,
                  "delta": spent.delta, "releases": spent.num_releases, "accountant": spent.accounting_method,
                  "noise_sd": float(dp_noise) * float(dp_clip) / n_sites, "level": "site (add/remove one site)",
                  "covers": "the FedAvg weight updates; the standardization round (global means and SDs) is "
                            "exact and not noised"}
    coef = w[1:] / scale
    d = {"kind": "fedrad.glm.logistic_model", "version": 1,
         "params": {"penalty": "l2", "C": float(C), "l1_ratio": None, "tol": 0.0, "max_rounds": int(rounds)},
         "feature_names": list(features), "coef": coef.tolist(), "intercept": float(w[0] - np.dot(mean, coef)),
         "coef_std": w[1:].tolist(), "intercept_std": float(w[0]), "mean": list(map(float, mean)),
         "scale": list(map(float, scale)), "excluded_features": [], "n": int(stats["n"]), "n_pos": int(stats["n_pos"]),
         "n_per_site": {}, "n_pos_per_site": {}, "converged": False, "n_rounds": int(rounds) + 1,
         "objective": None, "hessian_std": np.zeros((len(w), len(w))).tolist(), "history": [],
         "fit": strategy}
    info = {"mode": strategy, "round_trips": int(rounds) + 1, "approximate": True}
    if dp is not None:
        info["dp"] = dp
    return LogisticModel.from_dict(d), info
