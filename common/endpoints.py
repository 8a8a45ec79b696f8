"""Endpoint kinds: everything a study does differently for a binary response, a survival time and a continuous
outcome.

Plans, messages and results carry the endpoint as a plain dict (``{"type": "response", "outcome": "response"}``,
``{"type": "survival", "time": ..., "event": ...}``, ``{"type": "continuous", "outcome": ...}``); :func:`of` turns it into its kind's strategy object, and
the strategy's methods are the only place that branches on the type: outcome columns, the fit's model and its
site data, score tests, the penalty's direction and path, the pooled twin's fit, the held-out loss of inner
cross-validation, the metrics a held-out site computes and how they pool, the outcome checks and exclusions at
a site, and the words the report uses. Adding a kind is adding a class here (and its report figures).

Everything is pure (no Flower, no files); the coordinator, the sites and the pooled twin call the same methods.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

import numpy as np
import pandas as pd

ROC_EDGES = np.linspace(0.0, 1.0, 21)  # probability bins for the pooled ROC curve


class Endpoint:
    """One endpoint of a study (build with :func:`of`)."""

    type: ClassVar[str]
    #: the model fitted for it (site data spec ``model``; ``fedrad fit``'s model name)
    model: ClassVar[str]
    #: a site's metrics entry of the headline statistic, the estimate's key inside it, and its name
    metric: ClassVar[str]
    estimate: ClassVar[str]
    metric_label: ClassVar[str]
    #: what a model coefficient is (report), long and short
    effect_unit: ClassVar[str]
    effect_short: ClassVar[str]
    #: what the counts in ``n_events`` count (report; None: the kind has no event count)
    events_word: ClassVar[str | None]
    #: the headline statistic's no-information value (forest plot), the validation measures in words, what a
    #: paired comparison of two models measures, whether the kind has calibration and risk groups (TRIPOD, RQS)
    null_value: ClassVar[float] = 0.5
    performance_words: ClassVar[str]
    paired_words: ClassVar[str]
    #: the headline verdict's name for a paired difference, and what a better model does
    paired_delta: ClassVar[str] = "difference"
    verdict_verb: ClassVar[str] = "predicts"
    calibrated: ClassVar[bool] = True
    risk_groups: ClassVar[str | None] = None
    #: the scale the headline statistic is pooled on, and how its per-site CI is computed (report)
    pool_scale: ClassVar[str] = "logit"
    ci_words: ClassVar[str]
    #: the penalty value: larger is stronger (Cox's penalizer) or weaker (logistic C), and its name (report)
    larger_is_weaker: ClassVar[bool]
    penalty_name: ClassVar[str]
    #: the model, in words, and what the report says of applying it (None: nothing)
    model_words: ClassVar[str]
    model_note: ClassVar[str | None] = None

    def __init__(self, spec: Mapping[str, Any]):
        self.spec = {"type": self.type, **{k: str(spec[k]) for k in self.keys()}}

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The endpoint's column keys in the plan (``[endpoint]``)."""
        raise NotImplementedError

    def __getitem__(self, key: str):
        return self.spec[key]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec})"

    def as_dict(self) -> dict:
        return dict(self.spec)

    def columns(self) -> list[str]:
        """The outcome columns, in the plan's key order."""
        return [self.spec[k] for k in self.keys()]

    def describe(self) -> str:
        """The endpoint in words, with its columns (report)."""
        raise NotImplementedError

    def outcome_labels(self) -> dict[str, str]:
        """Row labels of the cohort table's ``events`` / ``non_events`` counts."""
        raise NotImplementedError

    def coefficients(self, params: dict) -> tuple[list[tuple], str]:
        """``[(feature, coefficient per SD, ci_low, ci_high)]`` of a fitted model's dict and what the numbers are."""
        raise NotImplementedError

    # -- model fitting -----------------------------------------------------------------------------------------
    def data_spec(self, features: list[str], table: str | None = None, rows: dict | None = None) -> dict:
        """A fit task's site data spec: model, features, outcome columns, table and row filter."""
        spec = {"features": list(features), "table": table, "rows": rows, "model": self.model}
        spec.update({k: self.spec[k] for k in self.keys()})
        return spec

    def strongest_first(self, grid) -> list[float]:
        """A penalty grid ordered from the strongest penalty."""
        return sorted(float(g) for g in grid) if self.larger_is_weaker else sorted((float(g) for g in grid),
                                                                                 reverse=True)

    @classmethod
    def path(cls, top: float, n: int, rho: float, exponents: list[float]) -> list[float]:
        """The penalty path from the all-zero point ``10**e`` steps in (see ``selection.penalty_path``)."""
        raise NotImplementedError

    def score_request(self, features: list[str]) -> dict:
        raise NotImplementedError

    #: whether the leakage screen's per-feature strength is a correlation |r| (else a concordance, AUC or C)
    leak_is_correlation = False
    #: what the leakage screen's strength is called in the log and the report
    leak_measure = "AUC"

    def concordance_request(self, features: list[str]) -> dict | None:
        """The leakage screen's per-feature concordance request (:mod:`fedrad.common.leakage`), or None when the
        screen uses the score tests (a continuous outcome)."""
        return None

    def leak_strength(self, combined: dict, score) -> pd.Series:
        """Per feature, the pooled training sites' univariate strength the leakage screen looks at."""
        return combined["leak"]

    def pooled_leak_strength(self, rows: pd.DataFrame, features: list[str], score, strata: str = "site"):
        """Pooled twin of :meth:`leak_strength`."""
        from fedrad.common.leakage import pooled_concordance

        return pooled_concordance(rows, self.concordance_request(features), strata=strata)

    def pooled_score(self, rows: pd.DataFrame, features: list[str], strata: str = "site"):
        """Pooled twin of the site-stratified score tests."""
        raise NotImplementedError

    def standardized_score(self, rows: pd.DataFrame, features: list[str], strata: str) -> tuple[np.ndarray, np.ndarray]:
        """``(U, sd)`` of the pooled penalty-path statistics (``selection.pooled_standardized_scores``): for a model
        with one intercept (logistic, linear) the gradient at zero :math:`\\sum (x-\\bar x)(y-\\bar y)` and the
        population SD, as the fit standardizes."""
        x = rows[list(features)].to_numpy(dtype=float)
        y = rows[self.spec["outcome"]].to_numpy(dtype=float)
        return (x - x.mean(axis=0)).T @ (y - y.mean()), x.std(axis=0)

    def make_fit(self, features: list[str], penalty: str, value: float, l1_ratio: float):
        """The server state machine of one fit (``value`` in the kind's penalty parameterization)."""
        raise NotImplementedError

    def fit_pooled(self, rows: pd.DataFrame, features: list[str], penalty: str, value: float, l1_ratio: float,
                   strata: str = "site"):
        """Pooled twin of :meth:`make_fit` (the oracle)."""
        raise NotImplementedError

    def model_from_dict(self, d: dict):
        raise NotImplementedError

    #: the ``kind`` tag of the kind's fitted-model dict, and how many rounds one fit may take at most (None: the
    #: site guard's general cap; an exact fit knows its count, which bounds the points a coordinator can register)
    model_kind: ClassVar[str]
    max_fit_rounds: ClassVar[int | None] = None

    def model_penalty(self, d: dict):
        """The penalty value of a fitted-model dict (the site's guard checks it against the plan)."""
        raise NotImplementedError

    def model_point(self, d: dict) -> tuple[dict, dict]:
        """``(point, scale)`` of a fitted-model dict, comparable with the points of the fit's requests (the guard):
        standardized coefficients with the intercept (scale 1), or Cox's original-scale coefficients and SDs."""
        names = list(d["feature_names"])
        pt = {"(intercept)": float(d["intercept_std"]), **dict(zip(names, d["coef_std"]))}
        return pt, {n: 1.0 for n in pt}

    def model_features(self, d: dict) -> list[str]:
        return list(d["feature_names"])

    def linear_predictor(self, model, rows: pd.DataFrame) -> np.ndarray:
        raise NotImplementedError

    def heldout_loss(self, model, rows: pd.DataFrame, train: np.ndarray) -> float:
        """A site's contribution to the inner-CV loss of a model fit without the rows ``~train``."""
        raise NotImplementedError

    # -- site data ---------------------------------------------------------------------------------------------
    def check_values(self, rows: pd.DataFrame, site: str, k: int = 0) -> None:
        """Raise a one-line ValueError naming the site and column when an outcome column holds values the kind
        cannot use (after the complete-case rule; ``k``: the site's minimum cell size)."""

    def exclusions(self, rows: pd.DataFrame):
        """Extra complete-case rules beyond a missing outcome value: ``[(bad mask, reason)]``."""
        return []

    def event_count(self, rows: pd.DataFrame) -> int:
        raise NotImplementedError

    def outcome_counts(self, rows: pd.DataFrame) -> dict[str, int]:
        """The cohort table's outcome counts (``events`` / ``non_events``; none for a continuous outcome)."""
        events = self.event_count(rows)
        return {"events": events, "non_events": int(len(rows)) - events}

    def cohort_extra(self, rows: pd.DataFrame, k: int) -> dict:
        """What a site's cohort description adds for the kind (withheld under ``k`` patients)."""
        return {}

    def fit_rows(self, rows: pd.DataFrame, features: list[str]):
        """A fit's rows in the form the model's site function takes."""
        raise NotImplementedError

    def site_function(self):
        raise NotImplementedError

    def policy_events(self, rows: pd.DataFrame) -> tuple[int, str]:
        """``(count, what)`` for the site's opt-in minimum-events rule."""
        raise NotImplementedError

    # -- evaluation --------------------------------------------------------------------------------------------
    def outcomes(self, rows: pd.DataFrame) -> tuple:
        raise NotImplementedError

    def n_events(self, outcome: tuple) -> int:
        raise NotImplementedError

    def curve_grid(self, outcome: tuple, km_times):
        """The grid a site's curve counts use (Kaplan-Meier times), or None."""
        return None

    def model_metrics(self, lp: np.ndarray, outcome: tuple, min_cell_size: int, grid) -> dict:
        raise NotImplementedError

    def paired(self, lp_a: np.ndarray, lp_b: np.ndarray, outcome: tuple) -> dict:
        raise NotImplementedError

    def decision_metrics(self, lp: np.ndarray, outcome: tuple, min_cell_size: int, horizon: float,
                         baseline: float) -> dict | None:
        """Decision-curve counts at a time horizon from a training baseline (survival only; None otherwise)."""
        return None

    def headline_metric(self, lp: np.ndarray, outcome: tuple) -> dict:
        """Only the headline statistic of one model on some rows (a subgroup): ``{metric: estimate}``."""
        raise NotImplementedError

    def subgroup_ok(self, outcome: tuple, k: int) -> bool:
        """Whether a subgroup's outcome counts allow releasing its headline statistic (each class, or the events,
        at least ``k``)."""
        return True

    def headline(self, site_metrics: dict) -> tuple[float | None, float | None]:
        """``(estimate, se)`` of one model's headline statistic at one site."""
        est = site_metrics[self.metric]
        return est.get(self.estimate), est.get("se")

    def pool_headline(self, values: list, ses: list, per_site: list[dict], kind: str) -> dict:
        """Random-effects (DerSimonian-Laird) pooling of one model's headline statistic over the held-out sites:
        AUC / C-index on the logit scale (:func:`fedrad.common.metrics.pool_proportion_like`)."""
        from fedrad.common import metrics

        ok = [(v, s) for v, s in zip(values, ses) if v is not None and s is not None and 0 < v < 1 and s > 0]
        entry: dict = {"k": len(ok)}
        if len(ok) >= 2:
            entry.update(metrics.pool_proportion_like([v for v, _ in ok], [s for _, s in ok]))
        elif len(ok) == 1:
            entry.update({"pooled": ok[0][0], "reason": "only one site with a defined estimate"})
        return entry

    def pool_curves(self, kind: str, per_site: list[dict]) -> dict:
        """Pooled curves (and other pooled summaries) of one model from the held-out sites' released numbers."""
        return {}


def _standardized_coefficients(m, unit: str, source: str) -> tuple[list[tuple], str]:
    """Coefficients per 1 SD of a model fitted on standardized features (logistic, linear), with 95% Wald
    intervals from ``m.covariance_std()`` over the non-constant features (None for an L1 / elastic-net fit)."""
    import math

    kept = np.flatnonzero(np.asarray(m.scale_) > 0)
    cov = m.covariance_std()
    out = []
    for i, j in enumerate(kept):
        b = float(m.coef_std_[j])
        se = math.sqrt(max(cov[i + 1, i + 1], 0.0)) if cov is not None else None
        out.append((m.feature_names_in_[j], b, None if se is None else b - 1.96 * se,
                    None if se is None else b + 1.96 * se))
    what = (f"{unit} per 1 SD of the feature (standardized scale, as the model is fitted); "
            + (f"95% Wald interval from {source} (L2: shrunken, approximate)"
               if cov is not None else "no interval: not meaningful for an L1 / elastic-net penalty"))
    return out, what


class Response(Endpoint):
    """Binary response (0/1 column ``outcome``): logistic regression, AUC, calibration, ROC."""

    type = "response"
    model = "logistic"
    metric, estimate, metric_label = "auc", "auc", "AUC"
    effect_unit, effect_short = "log odds ratio", "log OR"
    events_word = "positive outcomes"
    performance_words = "AUC (DeLong CI), Brier score, calibration intercept and slope"
    paired_words = "difference in AUC (DeLong covariance)"
    paired_delta, verdict_verb = "ΔAUC", "discriminates"
    ci_words = "DeLong"
    larger_is_weaker = True  # scikit-learn's C
    penalty_name = "C (inverse penalty strength)"
    model_words = "penalized logistic regression"

    @classmethod
    def keys(cls):
        return ("outcome",)

    def describe(self) -> str:
        return f"binary response (column {self.spec['outcome']})"

    def outcome_labels(self):
        col = self.spec["outcome"]
        return {"events": f"positive outcome ({col} = 1), n (%)", "non_events": f"negative outcome ({col} = 0), n (%)"}

    def coefficients(self, params):
        return _standardized_coefficients(self.model_from_dict(params), "log odds ratio",
                                          "the inverse penalized Hessian")

    @classmethod
    def path(cls, top, n, rho, exponents):
        start = rho / float(top)  # c_min_logistic: every coefficient is zero at and below it
        return [start * 10.0 ** e for e in exponents]

    def score_request(self, features):
        from fedrad.common.selection import logistic_score_request

        return logistic_score_request(features, self.spec["outcome"])

    def concordance_request(self, features):
        from fedrad.common.leakage import concordance_request

        return concordance_request(features, outcome=self.spec["outcome"])

    def pooled_score(self, rows, features, strata="site"):
        from fedrad.common.selection import pooled_logistic_score

        return pooled_logistic_score(rows, self.score_request(features), strata=strata)

    def make_fit(self, features, penalty, value, l1_ratio):
        from fedrad.common.glm import LogisticServer

        return LogisticServer(features, penalty=penalty, C=value,
                              l1_ratio=l1_ratio if penalty == "elasticnet" else None)

    def fit_pooled(self, rows, features, penalty, value, l1_ratio, strata="site"):
        from fedrad.common.glm import LogisticModel

        model = LogisticModel(penalty=penalty, C=value, l1_ratio=l1_ratio if penalty == "elasticnet" else None)
        return model.fit(rows[features], rows[self.spec["outcome"]].to_numpy())

    def model_from_dict(self, d):
        from fedrad.common.glm import LogisticModel

        return LogisticModel.from_dict(d)

    model_kind = "fedrad.glm.logistic_model"

    def model_penalty(self, d):
        return (d.get("params") or {}).get("C")

    def linear_predictor(self, model, rows):
        """The log odds."""
        return np.asarray(model.decision_function(rows), dtype=float)

    def heldout_loss(self, model, rows, train):
        """Summed log loss on the held-out rows."""
        lp = self.linear_predictor(model, rows)
        y = rows[self.spec["outcome"]].to_numpy(dtype=float)
        test = ~train
        return float(np.sum(np.logaddexp(0.0, lp[test]) - y[test] * lp[test]))

    def check_values(self, rows, site, k=0):
        col = self.spec["outcome"]
        bad = sorted(set(rows[col].unique()) - {0, 1})
        if bad:
            raise ValueError(f"site {site}: outcome column {col!r} has values {bad[:3]}; use 0/1")

    def event_count(self, rows):
        return int(rows[self.spec["outcome"]].sum())

    def fit_rows(self, rows, features):
        return rows[features].to_numpy(dtype=float), rows[self.spec["outcome"]].to_numpy()

    def site_function(self):
        from fedrad.common.glm import site_logistic

        return site_logistic

    def policy_events(self, rows):
        y = pd.to_numeric(rows[self.spec["outcome"]], errors="coerce")
        return min(int((y == 1).sum()), int((y == 0).sum())), "patients in the smaller outcome class"

    def outcomes(self, rows):
        return (rows[self.spec["outcome"]].to_numpy(dtype=int),)

    def n_events(self, outcome):
        return int(outcome[0].sum())

    def model_metrics(self, lp, outcome, min_cell_size, grid):
        """AUC with DeLong CI, Brier, calibration intercept and slope, probability-binned counts for the pooled ROC
        (neighbouring bins merged until each holds >= ``min_cell_size`` patients) and, in the same bins, the
        calibration plot's patients, events and mean predicted probability; true and false positives at the
        decision-curve thresholds (:func:`fedrad.common.metrics.decision_counts`)."""
        import scipy.special

        from fedrad.common import metrics
        from fedrad.common.report_stats import calibration_bins

        (y,) = outcome
        p = scipy.special.expit(lp)
        bins = metrics.suppress_small_cells(metrics.roc_bins(y, p, ROC_EDGES), min_cell_size)
        return {"auc": metrics.auc_delong(y, lp), "brier": float(metrics.brier(y, p)),
                "calibration": metrics.calibration(y, np.clip(p, 1e-12, 1 - 1e-12)),
                "roc_bins": bins,
                # observed vs mean predicted in the released ROC bins (each >= min_cell_size patients)
                "calibration_bins": (calibration_bins(y, p, bins["edges"]) if bins.get("edges") is not None
                                     else {"n": None, "reason": bins.get("reason")}),
                # true / false positives at the decision-curve thresholds: partial sums of the released bins
                "decision": metrics.decision_counts(bins)}

    def paired(self, lp_a, lp_b, outcome):
        from fedrad.common import metrics

        return metrics.delong_paired(outcome[0], lp_a, lp_b)

    def headline_metric(self, lp, outcome):
        from fedrad.common import metrics

        return {"auc": metrics.auc_delong(outcome[0], lp)}

    def subgroup_ok(self, outcome, k):
        events = int(outcome[0].sum())
        return min(events, len(outcome[0]) - events) >= k

    def pool_curves(self, kind, per_site):
        from fedrad.common import metrics
        from fedrad.common.report_stats import pool_calibration_bins

        entry: dict = {}
        tables = [m[kind]["roc_bins"] for m in per_site if m[kind].get("roc_bins")]
        try:
            roc = metrics.pooled_roc_interpolated(tables)
            entry["roc"] = {"fpr": list(map(float, roc.fpr)), "tpr": list(map(float, roc.tpr)),
                            "auc_binned": float(roc.auc)}
        except (ValueError, TypeError) as exc:
            entry["roc"] = {"reason": str(exc)}
        entry["calibration_bins"] = pool_calibration_bins([m[kind].get("calibration_bins") for m in per_site])
        entry["decision_curve"] = metrics.pooled_decision_curve([m[kind].get("decision") for m in per_site])
        return entry


class Survival(Endpoint):
    """Time to event (``time``, 0/1 ``event``): site-stratified Cox, Harrell's C, risk split, Kaplan-Meier."""

    type = "survival"
    model = "cox"
    metric, estimate, metric_label = "c_index", "c", "C-index"
    effect_unit, effect_short = "log hazard ratio", "log HR"
    events_word = "events"
    performance_words = "Harrell's C (CI), hazard ratio and log-rank of risk groups, Kaplan-Meier by risk group"
    paired_words = "difference in C-index (U-statistic covariance)"
    paired_delta, verdict_verb = "ΔC", "discriminates"
    ci_words = "U-statistic projection"
    calibrated = False  # site-specific baseline hazards: relative risk only (decision curves: a training baseline)
    risk_groups = "high vs low risk at the training mean of the linear predictor (pre-specified)"
    larger_is_weaker = False  # lifelines' penalizer
    penalty_name = "penalizer"
    model_words = "site-stratified penalized Cox regression"
    model_note = ("Site-stratified Cox model: each site keeps its own baseline hazard, so the model gives relative "
                  "risks (linear predictor); absolute survival probabilities need a site's baseline.")

    @classmethod
    def keys(cls):
        return ("time", "event")

    def describe(self) -> str:
        return f"time to event (columns {self.spec['time']}, {self.spec['event']})"

    def outcome_labels(self):
        col = self.spec["event"]
        return {"events": f"events ({col} = 1), n (%)", "non_events": f"censored ({col} = 0), n (%)"}

    def coefficients(self, params):
        import math

        m = self.model_from_dict(params)
        var = np.asarray(m.variance_matrix_, dtype=float)
        out = []
        for j, f in enumerate(m.feature_names_):
            sd = float(m.scale_[j])
            b = float(m.coef_[j]) * sd
            v = var[j, j] * sd * sd
            ok = np.isfinite(v) and v >= 0
            out.append((f, b, b - 1.96 * math.sqrt(v) if ok else None, b + 1.96 * math.sqrt(v) if ok else None))
        return out, ("log hazard ratio per 1 SD of the feature (coefficient × pooled SD; site-stratified Cox); 95% "
                     "Wald interval from the inverse penalized information (approximate)")

    @classmethod
    def path(cls, top, n, rho, exponents):
        start = float(top) / (int(n) * rho)  # glmnet's lambda_max
        return [start * 10.0 ** -e for e in exponents]

    def score_request(self, features):
        from fedrad.common.selection import cox_score_request

        return cox_score_request(features, self.spec["time"], self.spec["event"])

    def concordance_request(self, features):
        from fedrad.common.leakage import concordance_request

        return concordance_request(features, time=self.spec["time"], event=self.spec["event"])

    leak_measure = "C"

    def pooled_score(self, rows, features, strata="site"):
        from fedrad.common.selection import pooled_cox_score

        return pooled_cox_score(rows, self.score_request(features), strata=strata)

    def standardized_score(self, rows, features, strata):
        res = self.pooled_score(rows, list(features), strata=strata)
        return res.table["score"].to_numpy(dtype=float), rows[list(features)].to_numpy(dtype=float).std(axis=0, ddof=1)

    @staticmethod
    def _l1(penalty: str, l1_ratio: float) -> float:
        return {"l2": 0.0, "l1": 1.0}.get(penalty, l1_ratio)

    def make_fit(self, features, penalty, value, l1_ratio):
        from fedrad.common.cox import CoxFit

        return CoxFit(features, duration_col=self.spec["time"], event_col=self.spec["event"], penalizer=value,
                      l1_ratio=self._l1(penalty, l1_ratio))

    def fit_pooled(self, rows, features, penalty, value, l1_ratio, strata="site"):
        from fedrad.common.cox import fit_pooled as cox_pooled

        return cox_pooled(rows, self.spec["time"], self.spec["event"], strata=strata, features=features,
                          penalizer=value, l1_ratio=self._l1(penalty, l1_ratio))

    def model_from_dict(self, d):
        from fedrad.common.cox import CoxModel

        return CoxModel.from_dict(d)

    model_kind = "fedrad.cox.model"

    def model_penalty(self, d):
        return d.get("penalizer")

    def model_point(self, d):
        names = list(d["feature_names_"])
        return dict(zip(names, d["coef_"])), dict(zip(names, d["scale_"]))

    def model_features(self, d):
        return list(d["feature_names_"])

    def linear_predictor(self, model, rows):
        """The log partial hazard (centred on the training mean)."""
        return np.asarray(model.predict_log_partial_hazard(rows[list(model.feature_names_)]), dtype=float)

    def heldout_loss(self, model, rows, train):
        """Minus the cross-validated partial likelihood contribution of the site's stratum (Verweij & van
        Houwelingen 1993): −[ℓ(β; all rows) − ℓ(β; training rows)]."""
        from fedrad.common.cox import efron_stratum

        lp = self.linear_predictor(model, rows)
        t = rows[self.spec["time"]].to_numpy(dtype=float)
        e = rows[self.spec["event"]].to_numpy(dtype=float)
        x = lp[:, None]
        one = np.ones(1)
        ll_all = efron_stratum(x, t, e, one)[0] if e.sum() > 0 else 0.0
        ll_train = efron_stratum(x[train], t[train], e[train], one)[0] if e[train].sum() > 0 else 0.0
        return float(-(ll_all - ll_train))

    def check_values(self, rows, site, k=0):
        col = self.spec["event"]
        bad = sorted(set(rows[col].dropna().unique()) - {0, 1})
        if bad:
            raise ValueError(f"site {site}: event column {col!r} has values {bad[:3]}; use 0/1")

    def exclusions(self, rows):
        t = pd.to_numeric(rows[self.spec["time"]], errors="coerce").to_numpy(dtype=float)
        return [(np.isfinite(t) & (t < 0), f"negative {self.spec['time']}")]

    def event_count(self, rows):
        return int(rows[self.spec["event"]].sum())

    def cohort_extra(self, rows, k):
        """Follow-up: mean and SD of the observed times (events and censored)."""
        if len(rows) < k:
            return {}
        t = rows[self.spec["time"]].to_numpy(dtype=float)
        return {"follow_up": {"mean": float(t.mean()), "sd": float(t.std(ddof=1)) if len(t) > 1 else None}}

    def fit_rows(self, rows, features):
        return rows[features + [self.spec["time"], self.spec["event"]]].copy()

    def site_function(self):
        from fedrad.common.cox import site_cox

        return site_cox

    def policy_events(self, rows):
        events = pd.to_numeric(rows[self.spec["event"]], errors="coerce").fillna(0).astype(bool).sum()
        return int(events), "events"

    def outcomes(self, rows):
        return rows[self.spec["time"]].to_numpy(dtype=float), rows[self.spec["event"]].to_numpy(dtype=int)

    def n_events(self, outcome):
        return int(outcome[1].sum())

    def curve_grid(self, outcome, km_times):
        return np.asarray(km_times if km_times is not None else np.quantile(outcome[0], np.linspace(0, 1, 11)),
                          dtype=float)

    def model_metrics(self, lp, outcome, min_cell_size, grid):
        """Harrell's C with CI, hazard ratio and log-rank p of the high- vs low-risk split at the training mean
        risk (linear predictor > 0; its group and event counts withheld when a cell of the risk group x event
        table is under ``min_cell_size``), and Kaplan-Meier counts per risk group on ``grid``."""
        from fedrad.common import metrics

        t, e = outcome
        high = lp > 0.0
        split = metrics.risk_group_split(t, e, lp, 0.0)
        cells = (split["events_high"], split["n_high"] - split["events_high"], split["events_low"],
                 split["n_low"] - split["events_low"])
        if min(cells) < min_cell_size:  # a 2 x 2 table (risk group x event) with a small cell: no count released
            split.update(n_high=None, n_low=None, events_high=None, events_low=None)
        return {"c_index": metrics.harrell_c(t, e, lp), "risk_split": split,
                # Kaplan-Meier counts per risk group, intervals merged until no released count is under k
                "km": {g: (metrics.merge_km_bins(metrics.km_bins(t[m], e[m], grid), min_cell_size)
                           if m.sum() >= min_cell_size else None)
                       for g, m in (("high", high), ("low", ~high))}}

    def paired(self, lp_a, lp_b, outcome):
        from fedrad.common import metrics

        return metrics.c_paired(outcome[0], outcome[1], lp_a, lp_b)

    def decision_metrics(self, lp, outcome, min_cell_size, horizon, baseline):
        """Treated patients and their Kaplan-Meier survival at ``horizon`` at every decision threshold, the risk
        by the horizon from the training sites' ``baseline`` (:func:`fedrad.common.metrics.survival_decision_counts`;
        thresholds from the code, groups under k withheld)."""
        from fedrad.common import metrics

        return metrics.survival_decision_counts(lp, outcome[0], outcome[1], horizon=horizon, cumhaz=baseline,
                                                k=min_cell_size)

    def headline_metric(self, lp, outcome):
        from fedrad.common import metrics

        return {"c_index": metrics.harrell_c(outcome[0], outcome[1], lp)}

    def subgroup_ok(self, outcome, k):
        return int(outcome[1].sum()) >= k

    def pool_curves(self, kind, per_site):
        from fedrad.common import metrics
        from fedrad.common.messages import to_plain

        entry = {}
        for group in ("high", "low"):
            tables = [m[kind]["km"][group] for m in per_site if m[kind]["km"].get(group)]
            if tables:
                entry[f"km_{group}"] = to_plain(metrics.pooled_km(tables))
        decisions = [m[kind].get("decision") for m in per_site]
        if any(d is not None for d in decisions):  # the study plan has a decision-curve horizon
            entry["decision_curve"] = to_plain(metrics.pooled_survival_decision_curve(decisions))
        return entry


class Continuous(Endpoint):
    """Continuous outcome (column ``outcome``, e.g. an immune score): penalized linear regression (scikit-learn's
    ElasticNet / Ridge parameterization, :mod:`fedrad.common.linear`), validated by the Pearson correlation of
    predicted and observed (headline, pooled on Fisher's z), R², RMSE, MAE, calibration slope and Spearman."""

    type = "continuous"
    model = "linear"
    metric, estimate, metric_label = "pearson", "r", "Pearson r"
    effect_unit, effect_short = "change in the outcome", "Δ outcome"
    events_word = None
    null_value = 0.0
    performance_words = ("Pearson r of predicted and observed (Fisher-z CI), R², RMSE, MAE, calibration intercept "
                         "and slope, Spearman ρ")
    paired_words = "reduction in mean squared error (paired, normal approximation)"
    paired_delta, verdict_verb = "MSE reduction", "predicts"
    ci_words = "Fisher z"
    pool_scale = "Fisher-z"
    larger_is_weaker = False  # alpha
    penalty_name = "alpha (penalty strength)"
    model_words = "penalized linear regression"

    @classmethod
    def keys(cls):
        return ("outcome",)

    def describe(self) -> str:
        return f"continuous outcome (column {self.spec['outcome']})"

    def outcome_labels(self):
        return {}

    def coefficients(self, params):
        return _standardized_coefficients(self.model_from_dict(params), f"change in {self.spec['outcome']}",
                                          "σ² times the inverse penalized cross-product matrix")

    @classmethod
    def path(cls, top, n, rho, exponents):
        start = float(top) / (int(n) * rho)  # glmnet's lambda_max for standardized features
        return [start * 10.0 ** -e for e in exponents]

    def score_request(self, features):
        from fedrad.common.selection import linear_score_request

        return linear_score_request(features, self.spec["outcome"])

    leak_is_correlation = True
    leak_measure = "|r|"

    def leak_strength(self, combined, score):
        """The within-site correlation of each feature with the outcome: z / sqrt(n) of the linear score test."""
        return score.z / np.sqrt(float(score.n))

    def pooled_leak_strength(self, rows, features, score, strata="site"):
        return score.z / np.sqrt(float(score.n))

    def pooled_score(self, rows, features, strata="site"):
        from fedrad.common.selection import pooled_linear_score

        return pooled_linear_score(rows, self.score_request(features), strata=strata)

    @staticmethod
    def _penalty(penalty, l1_ratio):
        return penalty, (l1_ratio if penalty == "elasticnet" else None)

    def make_fit(self, features, penalty, value, l1_ratio):
        from fedrad.common.linear import LinearServer

        pen, rho = self._penalty(penalty, l1_ratio)
        return LinearServer(features, penalty=pen, alpha=value, l1_ratio=rho)

    def fit_pooled(self, rows, features, penalty, value, l1_ratio, strata="site"):
        from fedrad.common.linear import LinearModel

        pen, rho = self._penalty(penalty, l1_ratio)
        return LinearModel(penalty=pen, alpha=value, l1_ratio=rho).fit(rows[features], rows[self.spec["outcome"]])

    def model_from_dict(self, d):
        from fedrad.common.linear import LinearModel

        return LinearModel.from_dict(d)

    model_kind = "fedrad.linear.model"
    max_fit_rounds = 2  # statistics, then the check at the exact solution (fedrad.common.linear)

    def model_penalty(self, d):
        return (d.get("params") or {}).get("alpha")

    def linear_predictor(self, model, rows):
        """The predicted outcome."""
        return np.asarray(model.decision_function(rows), dtype=float)

    def heldout_loss(self, model, rows, train):
        """Half the summed squared error on the held-out rows (the fit's loss, per row)."""
        test = ~train
        res = rows[self.spec["outcome"]].to_numpy(dtype=float)[test] - self.linear_predictor(model, rows)[test]
        return float(0.5 * res @ res)

    def check_values(self, rows, site, k=0):
        col = self.spec["outcome"]
        counts = rows[col].value_counts()
        if len(counts) < 2:
            raise ValueError(f"site {site}: outcome column {col!r} is constant; a continuous endpoint needs "
                             "varying values")
        if len(rows) - int(counts.max()) < k:  # an indicator in disguise: its cross-products would be those few
            raise ValueError(f"site {site}: outcome column {col!r} differs from its most common value in fewer "
                             f"patients than the site's minimum cell size; it cannot be a continuous outcome here")

    def outcome_counts(self, rows):
        return {}

    def cohort_extra(self, rows, k):
        """The outcome's mean and SD (withheld under k patients)."""
        if len(rows) < k:
            return {"outcome_summary": None}
        y = rows[self.spec["outcome"]].to_numpy(dtype=float)
        return {"outcome_summary": {"mean": float(y.mean()), "sd": float(y.std(ddof=1)) if len(y) > 1 else None}}

    def fit_rows(self, rows, features):
        return rows[features].to_numpy(dtype=float), rows[self.spec["outcome"]].to_numpy(dtype=float)

    def site_function(self):
        from fedrad.common.linear import site_linear

        return site_linear

    def policy_events(self, rows):
        return int(len(rows)), "patients"

    def outcomes(self, rows):
        return (rows[self.spec["outcome"]].to_numpy(dtype=float),)

    def n_events(self, outcome):
        return None

    def model_metrics(self, lp, outcome, min_cell_size, grid):
        """R², RMSE, MAE, calibration intercept and slope, Pearson and Spearman with Fisher-z CIs
        (:func:`fedrad.common.metrics.regression_metrics`), and calibration groups of at least ``min_cell_size``
        patients (:func:`fedrad.common.metrics.calibration_groups`)."""
        from fedrad.common import metrics

        (y,) = outcome
        out = metrics.regression_metrics(y, lp)
        out["calibration_groups"] = metrics.calibration_groups(y, lp, min_cell_size)
        return out

    def paired(self, lp_a, lp_b, outcome):
        from fedrad.common import metrics

        return metrics.squared_error_paired(outcome[0], lp_a, lp_b)

    def headline_metric(self, lp, outcome):
        from fedrad.common import metrics

        return {"pearson": metrics.regression_metrics(outcome[0], lp)["pearson"]}

    def pool_headline(self, values, ses, per_site, kind):
        """Pearson r pooled by DerSimonian-Laird on Fisher's z."""
        from fedrad.common import metrics

        ns = [m[kind]["pearson"]["n"] for m in per_site]
        ok = [(v, n) for v, n in zip(values, ns) if v is not None and n is not None and n > 3 and abs(v) < 1]
        entry: dict = {"k": len(ok)}
        if len(ok) >= 2:
            entry.update(metrics.pool_correlations([v for v, _ in ok], [n for _, n in ok]))
        elif len(ok) == 1:
            entry.update({"pooled": ok[0][0], "reason": "only one site with a defined estimate"})
        return entry

    def pool_curves(self, kind, per_site):
        """Pooled RMSE and R² from the sites' sums of squares (exact: ΣSSE / Σn and 1 − ΣSSE / ΣSST, the SST about
        each site's own mean), Spearman pooled on Fisher's z, and the sites' calibration groups."""
        from fedrad.common import metrics

        sse = [m[kind].get("sse") for m in per_site]
        sst = [m[kind].get("sst") for m in per_site]
        n = [m[kind].get("n") for m in per_site]
        entry: dict = {}
        if all(v is not None for v in sse + sst + n):
            entry["rmse"] = float(np.sqrt(sum(sse) / sum(n)))
            entry["r2"] = float(1.0 - sum(sse) / sum(sst)) if sum(sst) > 0 else None
        rho = [m[kind]["spearman"]["rho"] for m in per_site]
        usable = [(r, m[kind]["spearman"]["n"]) for r, m in zip(rho, per_site)
                  if r is not None and abs(r) < 1 and m[kind]["spearman"]["n"] > 3]
        if len(usable) >= 2:
            sp = metrics.pool_correlations([r for r, _ in usable], [k for _, k in usable],
                                           z_var=metrics.SPEARMAN_Z_VARIANCE)
            entry["spearman"] = {k: sp[k] for k in ("pooled", "ci_low", "ci_high", "i2", "tau2", "k")}
        groups = [m[kind].get("calibration_groups") for m in per_site]
        entry["calibration_groups"] = [g for g in groups if g and g.get("n")]
        return entry


class Markers(Endpoint):
    """The "endpoint" of an association study: its molecular markers (each a continuous score or a 0/1 status).
    Only what the prepare phase needs: outcome columns, checks, exclusions and the cohort description; no model."""

    type = "association"
    model = "association"
    events_word = None

    def __init__(self, spec: Mapping[str, Any]):
        markers = spec.get("markers")
        if not isinstance(markers, (list, tuple)) or not markers:
            raise ValueError("an association study needs its markers ([association] markers = [...])")
        self.spec = {"type": self.type, "markers": [str(m) for m in markers]}

    @classmethod
    def keys(cls):
        return ()

    def columns(self):
        return list(self.spec["markers"])

    def describe(self) -> str:
        return "molecular markers " + ", ".join(self.spec["markers"])

    def outcome_labels(self):
        return {}

    def check_values(self, rows, site, k=0):
        for col in self.spec["markers"]:
            if rows[col].nunique() < 2:
                raise ValueError(f"site {site}: marker column {col!r} is constant; an association needs varying "
                                 "values")

    def outcome_counts(self, rows):
        return {}

    def cohort_extra(self, rows, k):
        """Per marker: a 0/1 status's positives (withheld with their complement under k), else mean and SD."""
        out = {}
        for col in self.spec["markers"]:
            y = rows[col].to_numpy(dtype=float)
            if set(np.unique(y).tolist()) <= {0.0, 1.0}:
                pos = int(y.sum())
                out[col] = {"positives": pos if min(pos, len(y) - pos) >= k else None}
            else:
                out[col] = ({"mean": float(y.mean()), "sd": float(y.std(ddof=1))} if len(y) >= k and len(y) > 1
                            else {"mean": None, "sd": None})
        return {"markers": out}


KINDS: dict[str, type[Endpoint]] = {k.type: k for k in (Response, Survival, Continuous)}  # prediction endpoints
ALL_KINDS: dict[str, type[Endpoint]] = {**KINDS, Markers.type: Markers}
BY_MODEL: dict[str, type[Endpoint]] = {k.model: k for k in KINDS.values()}


def of(spec: Mapping[str, Any] | Endpoint) -> Endpoint:
    """The strategy of an endpoint dict (``{"type": ..., column keys}``); an Endpoint is returned as is."""
    if isinstance(spec, Endpoint):
        return spec
    kind = ALL_KINDS.get(spec.get("type"))
    if kind is None:
        raise ValueError(f"unknown endpoint type {spec.get('type')!r}; use one of {', '.join(KINDS)}")
    return kind(spec)


def of_data(data: Mapping[str, Any]) -> Endpoint:
    """The endpoint of a fit's site data spec (``model`` and its outcome columns)."""
    kind = BY_MODEL.get(data.get("model"))
    if kind is None:
        raise ValueError(f"unknown model {data.get('model')!r}; use one of {', '.join(BY_MODEL)}")
    return kind(data)
