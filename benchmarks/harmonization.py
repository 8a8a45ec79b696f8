"""Does federated ComBat remove the site and scanner effects from real extracted features? (demo cohort, issue 16)

Steps: `fedrad demo-data --scanners-per-site S` (synthetic hospitals; with S = 2, the default, every site runs two
scanner models shared across sites, e.g. 4 models over 5 sites, and splits its patients between them; with S = 1
every site has one scanner of its own: the original site-only benchmark) -> `fedrad site extract` at each site
(shipped CT parameters) -> every method in METHODS (below) on the extracted features, age, sex and stage preserved:

  * no harmonization,
  * ComBat, batch = site (one batch per hospital),
  * ComBat, batch = scanner within site (`<site>/<scanner>` labels, as fedrad's `[harmonization] batch`),
  * ComBat, scanner batches shared across sites (`shared_batches`: one scanner model at several sites is one batch),
  * CovBat (ComBat + CovBat's PCA step) on the scanner-within-site batches, on the shared scanner batches, and on
    the site batches.

For each method:

 1. the share of features with a significant site effect (Kruskal-Wallis across sites) and with a significant
    scanner effect (Kruskal-Wallis across scanner models, pooled over sites), Benjamini-Hochberg FDR 5%, on the
    cohort harmonized by the federated fit (`fit_federated`: the in-process driver of the protocol the Flower
    handlers run, 2 round trips, messages through JSON);
 2. the accuracy of a scanner classifier (which scanner model imaged the patient) and of a site classifier
    (which hospital) from the features: 5-fold CV stratified on site x scanner, standardized multinomial logistic
    regression, against chance (the largest class's share). Harmonization is fit inside each fold: pooled ComBat
    (equal to the federated fit to 1e-10, tested) on the training rows only, then the held-out rows harmonized
    with the fitted reference (`ComBat.transform`: each batch's posterior from the fit; every batch is in every
    training fold). Cross-validating on data harmonized in-sample scores *below* chance, an artefact of batch
    means equalized over the whole sample;
 3. the mean distance of the per-scanner feature correlation matrices from the pooled one (RMS difference of the
    off-diagonal correlations; per site with S = 1), what CovBat targets, beside the same distance for random
    groups of the same sizes (the sampling-noise floor).

Batch effects should fall: the shares toward 0, the accuracies toward chance, the correlation distance toward
its floor.

Usage: python benchmarks/harmonization.py [--sites 5] [--patients 60] [--scanners-per-site 2] [--workdir DIR]
                                         [--jobs 2] [--params ct]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import kruskal
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fedrad.common.combat import ComBat, fit_federated
from fedrad.common.selection import benjamini_hochberg


COVARIATES, CATEGORICAL = ["age", "sex", "stage"], ["sex"]
SITE, SCANNER = "site", "scanner"
BATCH = "batch"            # "<site>/<scanner>": a site's own scanner batches (common.plan.site_batch_labels)
MIN_BATCH = 5              # smallest site x scanner group the benchmark accepts (5-fold CV needs one per fold)
N_FOLDS, CV_SEED = 5, 0
N_PERMUTATIONS = 5         # random groupings averaged for the correlation-distance floor


# ----------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------
class Method:
    """A harmonization method: ``harmonize`` fits on the whole cohort (the federated fit; for the effect shares
    and the correlation distance), ``fit_apply`` fits on a CV fold's training rows and harmonizes its held-out rows
    with what it fitted (for the classifiers)."""

    name = "?"
    needs_scanners = False   # needs the scanner column (skipped with --scanners-per-site 1)

    def harmonize(self, df: pd.DataFrame, feats: list[str]) -> tuple[pd.DataFrame, dict]:
        """``df`` with harmonized ``feats`` (same rows, same order) and the fitted reference's excluded features."""
        raise NotImplementedError

    def fit_apply(self, train: pd.DataFrame, test: pd.DataFrame, feats: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(harmonized training features, held-out features harmonized with the training fit)."""
        raise NotImplementedError


class NoHarmonization(Method):
    name = "none"

    def harmonize(self, df, feats):
        return df, {}

    def fit_apply(self, train, test, feats):
        return train[feats].to_numpy(float), test[feats].to_numpy(float)


#: ComBat-GAM knots for age as a study plan writes them (lower boundary, interior knots, upper boundary): set by
#: :func:`choose_age_knots` from the cohort's k-respecting histograms, as the study does
AGE_KNOTS = [25.0, 55.0, 63.0, 71.0, 90.0]
#: the plan's age range and histogram bins for the knots (the demo's ages are 25-90)
AGE_RANGE, AGE_BINS = (25.0, 90.0), 32


class ComBatMethod(Method):
    """ComBat (``covbat=True``: CovBat; ``smooth=True``: ComBat-GAM with age as a smooth term on
    :data:`AGE_KNOTS`; ``eb=False``: no empirical Bayes) with batches ``batch``: ``site`` (one batch per site),
    :data:`BATCH` (scanner within site) or ``scanner`` (scanner models shared across sites, ``shared_batches``).
    ``then``: nested ComBat, another batch column harmonized after this one (each pass on the previous output)."""

    def __init__(self, name: str, batch: str, covbat: bool = False, smooth: bool = False, eb: bool = True,
                 then: str | None = None):
        self.name, self.batch, self.covbat, self.smooth, self.eb, self.then = name, batch, covbat, smooth, eb, then
        self.needs_scanners = batch != SITE or then is not None

    def _options(self) -> dict:
        from fedrad.common.smooth import full_knots

        covs = [c for c in COVARIATES if not (self.smooth and c == "age")]
        return {"covariates": covs, "categorical": CATEGORICAL, "covbat": True if self.covbat else None,
                "eb": self.eb, "smooth": {"age": list(full_knots(AGE_KNOTS[1:-1], AGE_KNOTS[0], AGE_KNOTS[-1]))}
                if self.smooth else None}

    def _passes(self) -> list[str]:
        return [self.batch] + ([self.then] if self.then else [])

    def harmonize(self, df, feats):
        out, excluded, rounds = df.copy(), {}, 0
        for batch in self._passes():
            tables = {s: g[feats + COVARIATES + [BATCH, SCANNER]] if self.needs_scanners else g[feats + COVARIATES]
                      for s, g in out.groupby(SITE, sort=True)}
            opts = self._options()
            fed = fit_federated(tables, feats, opts.pop("covariates"), opts.pop("categorical"),
                                batch_col=None if batch == SITE else batch, shared_batches=batch == SCANNER, **opts)
            for s, h in fed.harmonized.items():
                out.loc[h.index, feats] = h[feats].to_numpy(float)
            excluded.update(fed.reference.excluded_features or {})
            rounds += fed.round_trips
        return out, {"excluded": excluded, "round_trips": rounds}

    def fit_apply(self, train, test, feats):
        xtr, xte = train.copy(), test.copy()
        for batch in self._passes():
            opts = self._options()
            model = ComBat(**opts)
            covs = opts["covariates"] + (["age"] if self.smooth else [])
            xtr[feats] = np.asarray(model.fit_transform(xtr[feats], xtr[batch].to_numpy(), xtr[covs]), float)
            xte[feats] = np.asarray(model.transform(xte[feats], xte[batch].to_numpy(), xte[covs]), float)
        return xtr[feats].to_numpy(float), xte[feats].to_numpy(float)


METHODS: list[Method] = [
    NoHarmonization(),
    ComBatMethod("ComBat, batch = site", SITE),
    ComBatMethod("ComBat, batch = scanner within site", BATCH),
    ComBatMethod("ComBat, shared scanner batches", SCANNER),
    ComBatMethod("ComBat without EB, scanner within site", BATCH, eb=False),
    ComBatMethod("nested ComBat: site, then shared scanner", SITE, then=SCANNER),
    ComBatMethod("ComBat-GAM (smooth age), shared scanner", SCANNER, smooth=True),
    ComBatMethod("CovBat, batch = scanner within site", BATCH, covbat=True),
    ComBatMethod("CovBat, shared scanner batches", SCANNER, covbat=True),
    ComBatMethod("CovBat, batch = site", SITE, covbat=True),
    ComBatMethod("ComBat-GAM + CovBat, shared scanner", SCANNER, covbat=True, smooth=True),
]


# ----------------------------------------------------------------------------------------------
# Measures
# ----------------------------------------------------------------------------------------------
def significant_fraction(df: pd.DataFrame, feats: list[str], by: str) -> float:
    """Share of ``feats`` whose distribution differs across the groups of ``by`` (Kruskal-Wallis, BH FDR 5%)."""
    groups = [g for _, g in df.groupby(by)]
    p = np.array([kruskal(*[g[f].to_numpy() for g in groups]).pvalue for f in feats])
    return float((benjamini_hochberg(p) <= 0.05).mean())  # BH step-up: rejected iff q <= alpha


def classifier_accuracies(method: Method, df: pd.DataFrame, feats: list[str], targets: list[str],
                          strata: np.ndarray) -> dict[str, float]:
    """5-fold CV accuracy of predicting each of ``targets`` from the features, harmonization fit inside each fold."""
    cv = StratifiedKFold(n_splits=N_FOLDS, shuffle=True, random_state=CV_SEED)
    correct = dict.fromkeys(targets, 0)
    for train, test in cv.split(df, strata):
        tr, te = df.iloc[train], df.iloc[test]
        xtr, xte = method.fit_apply(tr, te, feats)
        for target in targets:
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, C=1.0))
            clf.fit(xtr, tr[target].to_numpy())
            correct[target] += int((clf.predict(xte) == te[target].to_numpy()).sum())
    return {t: c / len(df) for t, c in correct.items()}


def _rms_offdiag(a: np.ndarray, b: np.ndarray) -> float:
    off = ~np.eye(len(a), dtype=bool)
    return float(np.sqrt(np.mean((a - b)[off] ** 2)))


def correlation_distance(x: np.ndarray, groups: np.ndarray) -> float:
    """Mean over groups of the RMS difference between the group's feature correlations and the pooled ones."""
    pooled = np.corrcoef(x, rowvar=False)
    return float(np.mean([_rms_offdiag(np.corrcoef(x[groups == g], rowvar=False), pooled)
                          for g in np.unique(groups)]))


def correlation_floor(x: np.ndarray, groups: np.ndarray) -> float:
    """:func:`correlation_distance` for random groups of the same sizes (mean of :data:`N_PERMUTATIONS`)."""
    rng = np.random.default_rng(0)
    return float(np.mean([correlation_distance(x, rng.permutation(groups)) for _ in range(N_PERMUTATIONS)]))


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def cohort(args, work: Path) -> tuple[pd.DataFrame, dict]:
    """Demo cohort -> features extracted at every site (`fedrad site extract`); wall times of both steps."""
    fedrad = str(Path(sys.executable).parent / "fedrad")
    data = work / f"demo-{args.sites}x{args.patients}-scanners{args.scanners_per_site}"
    times = {}
    t0 = time.perf_counter()
    if not (data / "README.txt").exists():
        subprocess.run([fedrad, "demo-data", "--sites", str(args.sites), "--patients", str(args.patients),
                        "--scanners-per-site", str(args.scanners_per_site), "--out", str(data)],
                       check=True, capture_output=True)
    times["demo-data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tables = []
    for k in range(1, args.sites + 1):
        site = f"site{k}"
        out = data / site / "features.parquet"
        subprocess.run([fedrad, "site", "extract", str(data / site / "manifest.csv"), "--params", args.params,
                        "--out", str(out), "--jobs", str(args.jobs)], check=True, capture_output=True)
        tables.append(pd.read_parquet(out).assign(site=site))
    times["extraction"] = time.perf_counter() - t0
    df = pd.concat(tables, ignore_index=True)
    if SCANNER not in df.columns:  # one scanner per site: the site's own
        df[SCANNER] = df[SITE]
    df[BATCH] = df[SITE] + "/" + df[SCANNER].astype(str)
    small = df[BATCH].value_counts()
    small = small[small < MIN_BATCH]
    if len(small):
        raise SystemExit(f"site x scanner groups {dict(small)} have fewer than {MIN_BATCH} patients; "
                         f"raise --patients")
    return df, times


def choose_age_knots(df: pd.DataFrame, feats: list[str], methods: list) -> str:
    """The ComBat-GAM knots as a study derives them (``smooth = {age = {knots = n, range = [25, 90]}}``): interior
    knots at the pooled quantiles of the sites' histograms (plan bins merged to >= k per bin); the most interior
    knots (3, 2, 1) whose every spline piece covers none or >= k patients of every batch of every smooth method
    (the site refuses a piece over fewer). Sets :data:`AGE_KNOTS`; returns what it chose, in words."""
    from fedrad.common.combat import SmallBatchError
    from fedrad.common.smooth import pooled_quantile_knots, site_histogram

    edges = np.linspace(*AGE_RANGE, AGE_BINS + 1)
    hists = [site_histogram(g["age"].to_numpy(float), edges, 2, name="age") for _, g in df.groupby(SITE)]
    smooth = [m for m in methods if getattr(m, "smooth", False)]
    refused = []
    for n in (3, 2, 1):
        full = pooled_quantile_knots(hists, n)
        AGE_KNOTS[:] = [float(full[0])] + [float(v) for v in full[4:-4]] + [float(full[-1])]
        try:
            for m in smooth:
                m.harmonize(df, feats)
        except SmallBatchError as exc:
            refused.append(f"{n} interior: {exc}")
            continue
        return (f"age knots {', '.join(f'{v:g}' for v in AGE_KNOTS)} ({n} interior, pooled quantiles)"
                + (f"; refused first: {'; '.join(refused)}" if refused else ""))
    raise SystemExit("no ComBat-GAM knots for age pass the sites' spline-piece rule: " + "; ".join(refused))


def candidate_features(df: pd.DataFrame) -> list[str]:
    """original_ and LoG features that vary within every site x scanner group."""
    feats = [c for c in df.columns if str(c).startswith(("original_", "log-sigma"))]
    return [f for f in feats if df[f].std() > 0 and all(g[f].std() > 0 for _, g in df.groupby(BATCH))]


# ----------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--patients", type=int, default=60, help="patients per site")
    ap.add_argument("--scanners-per-site", type=int, default=2,
                    help="2 (default): scanner models shared across sites; 1: each site its own scanner "
                         "(the site-only benchmark)")
    ap.add_argument("--workdir", type=Path, default=None, help="keeps the cohort and features for re-runs")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--params", default="ct", help="extraction parameters (`fedrad site extract --params`)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fedrad-harm-"))
    df, times = cohort(args, work)
    scanners = args.scanners_per_site > 1
    methods = [m for m in METHODS if scanners or not m.needs_scanners]

    t0 = time.perf_counter()
    feats = candidate_features(df)
    print(choose_age_knots(df, feats, methods), flush=True)
    harmonized, excluded, round_trips = {}, {}, 0
    for _ in range(2):  # a feature a fit excludes (zero variance) is dropped for every method, then all refit
        for m in methods:
            harmonized[m.name], info = m.harmonize(df, feats)
            excluded.update(info.get("excluded", {}))
            round_trips = info.get("round_trips", round_trips)
        if not excluded:
            break
        feats = [f for f in feats if f not in excluded]
        excluded = {}
    times["federated fits"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    targets = [SCANNER, SITE] if scanners else [SITE]
    strata = df[BATCH].to_numpy()
    groups = df[SCANNER if scanners else SITE].to_numpy()
    rows = []
    for m in methods:
        h = harmonized[m.name]
        acc = classifier_accuracies(m, df, feats, targets, strata)
        x = h[feats].to_numpy(float)
        rows.append({"method": m.name,
                     "site_sig": significant_fraction(h, feats, SITE),
                     "scanner_sig": significant_fraction(h, feats, SCANNER) if scanners else np.nan,
                     "scanner_acc": acc.get(SCANNER, np.nan), "site_acc": acc[SITE],
                     "corr": correlation_distance(x, groups), "floor": correlation_floor(x, groups)})
    times["measures and CV"] = time.perf_counter() - t0

    n_scanners = df[SCANNER].nunique()
    chance_site = df[SITE].value_counts(normalize=True).max()
    chance_scanner = df[SCANNER].value_counts(normalize=True).max()
    per_site = df.groupby(SITE)[SCANNER].agg(lambda s: "+".join(f"{v}({c})" for v, c in
                                                                  s.value_counts().sort_index().items()))
    n_log = sum(f.startswith("log-sigma") for f in feats)
    print(f"demo cohort: {args.sites} sites x {args.patients} patients, {len(feats)} features "
          f"(--params {args.params}: {len(feats) - n_log} original + {n_log} LoG), "
          f"covariates preserved: {', '.join(COVARIATES)}")
    if scanners:
        print(f"scanners: {n_scanners} scanner models shared across sites, {args.scanners_per_site} per site, "
              f"patients per site/scanner: " + "; ".join(f"{s} {v}" for s, v in per_site.items()))
    else:
        print("scanners: one per site (the site's own)")
    print(f"federated fits: fit_federated, {round_trips} round trips each; classifiers: {N_FOLDS}-fold CV "
          f"stratified on {'site x scanner' if scanners else 'site'}, harmonization fit on the training rows of "
          f"each fold")
    print()
    print("columns:")
    print("  site sig    = share of features with a significant site effect (Kruskal-Wallis across sites, BH FDR 5%)")
    if scanners:
        print(f"  scanner sig = share of features with a significant scanner effect (Kruskal-Wallis across the "
              f"{n_scanners} scanner models, BH FDR 5%)")
        print(f"  scanner acc = CV accuracy of a classifier predicting the scanner model (chance {chance_scanner:.2f})")
    print(f"  site acc    = CV accuracy of a classifier predicting the site (chance {chance_site:.2f})")
    what = "scanner" if scanners else "site"
    print(f"  corr dist   = mean over {what}s of the RMS difference between the {what}'s feature correlations "
          f"and the pooled ones")
    print(f"  corr floor  = the same for random groups of the same sizes (sampling noise, mean of {N_PERMUTATIONS})")
    print()
    width = max(len(r["method"]) for r in rows) + 2
    cols = ["site sig", "scanner sig", "scanner acc", "site acc", "corr dist", "corr floor"] if scanners else \
        ["site sig", "site acc", "corr dist", "corr floor"]
    print(f"{'method':<{width}}" + "".join(f"{c:>13}" for c in cols))
    for r in rows:
        vals = [f"{r['site_sig']:.0%}", f"{r['scanner_sig']:.0%}", f"{r['scanner_acc']:.2f}", f"{r['site_acc']:.2f}",
                f"{r['corr']:.3f}", f"{r['floor']:.3f}"]
        if not scanners:
            vals = [vals[0], vals[3], vals[4], vals[5]]
        print(f"{r['method']:<{width}}" + "".join(f"{v:>13}" for v in vals))
    print(f"{'chance':<{width}}" + "".join(f"{v:>13}" for v in (
        ["", "", f"{chance_scanner:.2f}", f"{chance_site:.2f}", "", ""] if scanners else
        ["", f"{chance_site:.2f}", "", ""])))
    print()
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
          + f"; total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
