"""Accuracy cost of the privacy options on the real UCI Heart Disease table (4 hospitals), in one run.

Split and penalty exactly as benchmarks/published.py (its loader and federated 3-fold CV choice of C; no
setting is chosen on test data). Every fit runs through Flower's message layer in-process (LocalGrid, the real
site ClientApp):

* exact            fedrad's exact federated logistic fit (= pooled fit)
* exact + SecAgg+  the same fit, every round's sums combined by Flower's SecAgg+ (``--secure-aggregation``)
* FedAvg           Flower's FedAvg, 20 rounds, sites weighted by rows (``--strategy fedavg``)
* FedAvg, equal weights   the DP machinery without noise (clip 1e6, z 1e-9): isolates the cost of equal weights
* FedAvg + DP      Flower's DifferentialPrivacyClientSideFixedClipping, clip 0.5, noise multiplier z
                   (``--dp-noise z --dp-clip 0.5``), 5 noise seeds each; ε at δ = 1e-5 (site-level, exact
                   Gaussian-DP accounting; the Rényi-DP figure an RDP accountant reports is shown beside it)

Metrics on the hospitals' test sets: AUC and accuracy at 0.5 on the union of test sets, accuracy averaged over
the 4 centres (FLamby's metric); ratios against the exact fit of the same run; wall seconds and round trips.

    python benchmarks/privacy.py [--seeds 5]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.published import DATA, cv_choose, heart_splits  # noqa: E402

from fedrad.client.audit import AuditLog  # noqa: E402
from fedrad.common.privacy import gaussian_epsilon, noise_multiplier_for, rdp_epsilon  # noqa: E402
from fedrad.local import fit_fedavg, fit_table  # noqa: E402

ROUNDS, CLIP, DELTA = 20, 0.5, 1e-5
NOISE = [0.3, 1.0, 3.0, 10.0]


def scores(model, test, feats) -> dict:
    p = model.predict_proba(test[feats])[:, 1]
    acc = {s: float(((model.predict_proba(d[feats])[:, 1] > 0.5) == d["y"]).mean()) for s, d in test.groupby("site")}
    return {"auc": float(roc_auc_score(test["y"], p)), "acc": float(((p > 0.5) == test["y"]).mean()),
            "acc_centres": float(np.mean(list(acc.values())))}


def clipped_fraction(workdir: Path) -> float:
    recs = [r for log in workdir.glob("*/audit.jsonl") for r in AuditLog(log).entries()
            if r["request"] == "fedavg" and r["status"] == "sent"]
    return float(np.mean([r["payload"]["dp"]["clipped"] for r in recs])) if recs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="noise seeds per DP setting")
    args = ap.parse_args()
    if not DATA.exists():
        raise SystemExit(f"{DATA} not found: the benchmark needs ../shared/data/multisite-tabular")
    train, test, feats = heart_splits()
    C = cv_choose(train, feats, "logistic", outcome="y")
    print(f"UCI heart: {len(train)} training rows in {train.site.nunique()} hospitals, {len(test)} test rows, "
          f"{len(feats)} features; L2 C = {C} by federated 3-fold CV on the training rows")
    rows = []

    def run(label, fn, **extra):
        t0 = time.perf_counter()
        model, info = fn()
        sec = time.perf_counter() - t0
        rows.append({"label": label, **scores(model, test, feats), "sec": sec, "trips": info["round_trips"],
                     "model": model, "info": info, **extra})
        return model, info

    exact, _ = run("exact", lambda: fit_table(train, "site", "logistic", feats, outcome="y", C=C, federated=True,
                                              min_cell_size=2))
    secure, sinfo = run("exact + SecAgg+", lambda: fit_table(train, "site", "logistic", feats, outcome="y", C=C,
                                                             federated=True, min_cell_size=2,
                                                             secure_aggregation=True))
    run("FedAvg (rows-weighted)", lambda: fit_fedavg(train, "site", feats, "y", C=C, rounds=ROUNDS, min_cell_size=2))
    np.random.seed(0)
    run("FedAvg, equal weights, no noise", lambda: fit_fedavg(train, "site", feats, "y", C=C, rounds=ROUNDS,
                                                              min_cell_size=2, dp_noise=1e-9, dp_clip=1e6))
    dp_rows = []
    for z in NOISE:
        for seed in range(args.seeds):
            np.random.seed(seed)
            with tempfile.TemporaryDirectory() as tmp:
                run(f"FedAvg + DP z={z:g}", lambda: fit_fedavg(train, "site", feats, "y", C=C, rounds=ROUNDS,
                                                              min_cell_size=2, dp_noise=z, dp_clip=CLIP,
                                                              workdir=Path(tmp)), z=z, seed=seed)
                rows[-1]["clipped"] = clipped_fraction(Path(tmp))
            dp_rows.append(rows[-1])

    base = rows[0]
    print(f"\nexact + SecAgg+ vs exact: max |coefficient difference| (standardized) "
          f"{np.abs(secure.coef_std_ - exact.coef_std_).max():.1e}, intercept "
          f"{abs(secure.intercept_std_ - exact.intercept_std_):.1e}; secure rounds {sinfo['secure_rounds']} "
          f"(plain {exact.n_rounds_}), {sinfo['round_trips']} message round trips (4 SecAgg+ stages each)")
    print(f"\n{'method':34s}{'AUC':>8s}{'acc':>8s}{'acc/ctr':>9s}{'AUC/ex':>8s}{'acc/ex':>8s}{'|dcoef|':>9s}"
          f"{'eps':>8s}{'eps RDP':>9s}{'clipped':>8s}{'sec':>7s}{'x ex':>6s}{'trips':>6s}")
    for r in rows[:4]:
        _line(r, base)
    for z in NOISE:
        group = [r for r in dp_rows if r["z"] == z]
        mean = {k: float(np.mean([g[k] for g in group])) for k in ("auc", "acc", "acc_centres", "sec", "clipped")}
        sd = {k: float(np.std([g[k] for g in group])) for k in ("auc", "acc")}
        dcoef = float(np.mean([np.abs(g["model"].coef_std_ - exact.coef_std_).max() for g in group]))
        eps, eps_rdp = gaussian_epsilon(z, ROUNDS, DELTA), rdp_epsilon(z, ROUNDS, DELTA)
        print(f"{'FedAvg + DP z=' + format(z, 'g') + f' ({len(group)} seeds)':34s}{mean['auc']:8.3f}{mean['acc']:8.3f}"
              f"{mean['acc_centres']:9.3f}{mean['auc'] / base['auc']:8.3f}{mean['acc'] / base['acc']:8.3f}"
              f"{dcoef:9.3f}{eps:8.2f}{eps_rdp:9.2f}{mean['clipped']:8.2f}{mean['sec']:7.1f}"
              f"{mean['sec'] / base['sec']:6.1f}{group[0]['trips']:6d}")
        print(f"{'    (SD over seeds)':34s}{sd['auc']:8.3f}{sd['acc']:8.3f}")
    print(f"\nDP: site-level (add/remove one hospital), every hospital in all {ROUNDS} rounds (no sampling "
          f"amplification), delta = {DELTA:g}, clip {CLIP}; noise SD on the average = z*{CLIP}/4. "
          f"Noise for epsilon = 1 / 3 / 10 over {ROUNDS} rounds: z = "
          + " / ".join(f"{noise_multiplier_for(e, DELTA, ROUNDS):.2f}" for e in (1, 3, 10)) + ".")


def _line(r, base):
    dcoef = np.abs(r["model"].coef_std_ - base["model"].coef_std_).max()
    print(f"{r['label']:34s}{r['auc']:8.3f}{r['acc']:8.3f}{r['acc_centres']:9.3f}{r['auc'] / base['auc']:8.3f}"
          f"{r['acc'] / base['acc']:8.3f}{dcoef:9.1e}{'-':>8s}{'-':>9s}{'-':>8s}{r['sec']:7.1f}"
          f"{r['sec'] / base['sec']:6.1f}{r['trips']:6d}")


if __name__ == "__main__":
    main()
