"""Round trips and wall time of a whole study for K = 3, 5, 10 sites: rounds must not grow with K.

Every phase sends one message per site carrying all validation folds (K + 1 of them), so K only changes what
each message holds, not how many round trips there are. Sites hold synthetic feature tables (120 patients,
9 radiomic features + volume + clinical covariates, site-specific scanner shifts).

    python -m benchmarks.rounds                       # in-process Flower message layer (fast)
    python -m benchmarks.rounds --runtime deployment [--stock]
        # also a real SuperLink + K SuperNodes on loopback (fedrad's fast site runtime; --stock adds Flower's
        # stock SuperNode): wall time beside the in-process run of the same study, and their ratio
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fedrad.server.study_config import _merge, validate


def make_sites(root: Path, k: int, n: int = 120, seed: int = 0) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    nodes = []
    for s in range(k):
        bio = rng.normal(size=(n, 3))
        stage = rng.integers(1, 5, n)
        X = np.column_stack([bio + rng.normal(scale=0.5, size=(n, 3)), rng.normal(size=(n, 6))]) * (1 + 0.1 * s) + s
        lp = 1.2 * bio[:, 0] - 0.8 * bio[:, 1] + 0.3 * (stage - 2.5)
        d = pd.DataFrame(X, columns=[f"original_glcm_F{i}" for i in range(9)])
        d["original_shape_VoxelVolume"] = np.exp(rng.normal(7, 0.5, n))
        d["age"], d["stage"], d["sex"] = rng.normal(60, 8, n), stage, rng.choice(["F", "M"], n)
        d["response"] = (rng.random(n) < 1 / (1 + np.exp(-lp))).astype(int)
        d["case_id"] = [f"s{s}-{i}" for i in range(n)]
        path = root / f"site{s}" / "features.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        d.to_parquet(path)
        nodes.append({"site-name": f"site{s}", "table": str(path), "workdir": str(root / f"site{s}" / "work"),
                      "min-cell-size": 10})
    cfg = validate(_merge({"study": {"name": f"rounds K={k}", "min_sites": 3},
                           "endpoint": {"type": "response", "outcome": "response"},
                           "harmonization": {"covariates": ["age", "sex"], "categorical": ["sex"]},
                           "model": {"clinical": ["age", "stage"], "grid": [0.1, 1.0]}}))
    return cfg, nodes


def run_local(cfg, nodes) -> tuple[int, float]:
    from fedrad.local import run_study_in_process

    t0 = time.perf_counter()
    res = run_study_in_process(cfg, nodes)
    return res["round_trips"], time.perf_counter() - t0


def run_deployment(cfg, nodes, root: Path, fast: bool = True) -> tuple[int, float]:
    from fedrad.server.plans import write_json_atomic
    from fedrad.server.runtime import LoopbackDeployment, SiteNode

    write_json_atomic({"task": "study", "config": cfg}, root / "plan.json")
    sites = [SiteNode(n["site-name"], {k: v for k, v in n.items() if k != "site-name"}) for n in nodes]
    from fedrad.local import approve_plan_file_at_sites

    approve_plan_file_at_sites(root / "plan.json", nodes)  # each site's operator approves the published plan
    t0 = time.perf_counter()
    with LoopbackDeployment(root / "flower", sites, fast=fast) as dep:
        run_id = dep.submit({"plan": str(root / "plan.json"), "out-dir": str(root / "out"),
                             "expected-sites": len(nodes), "round-timeout": 900.0})
        dep.wait(run_id, timeout=3600, done_file=root / "out" / "results.json", finished=False)
    res = json.loads((root / "out" / "results.json").read_text())
    return res["round_trips"], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", choices=["local", "deployment"], default="local")
    ap.add_argument("--sites", default="3,5,10", help="comma-separated K values")
    ap.add_argument("--stock", action="store_true", help="deployment: also run Flower's stock SuperNode (no fast "
                    "site runtime) for each K and print its wall time beside the fast one")
    args = ap.parse_args()
    rows = []
    for k in [int(x) for x in args.sites.split(",")]:
        row = {"k": k}
        with tempfile.TemporaryDirectory(prefix=f"fedrad-rounds-{k}-") as tmp:
            cfg, nodes = make_sites(Path(tmp) / "local", k)
            row["rounds"], row["local"] = run_local(cfg, nodes)
            print(f"K = {k:2d} sites: {row['rounds']} round trips, study wall time in-process {row['local']:.1f} s",
                  flush=True)
            if args.runtime == "deployment":
                modes = [("fast", True)] + ([("stock", False)] if args.stock else [])
                for mode, fast in modes:
                    cfg, nodes = make_sites(Path(tmp) / mode, k)
                    rounds, secs = run_deployment(cfg, nodes, Path(tmp) / mode, fast=fast)
                    row[mode] = secs
                    print(f"K = {k:2d} sites: {rounds} round trips, study wall time on the deployment runtime "
                          f"({mode} site runtime) {secs:.1f} s = {secs / row['local']:.1f} x in-process, "
                          f"{(secs - row['local']) / max(rounds, 1):.2f} s per round trip over in-process",
                          flush=True)
        rows.append(row)
    base = rows[0]
    for row in rows[1:]:
        line = (f"K = {row['k']} vs K = {base['k']}: round trips x{row['rounds'] / base['rounds']:.2f}, "
                f"in-process wall time x{row['local'] / base['local']:.2f}")
        if "fast" in row:
            line += f", deployment wall time x{row['fast'] / base['fast']:.2f}"
        print(line)
    if args.runtime == "deployment":
        print("SUMMARY deployment / in-process wall-time ratio: " + ", ".join(
            f"K={r['k']}: fast {r['fast'] / r['local']:.2f}" + (f", stock {r['stock'] / r['local']:.2f}"
                                                                   if "stock" in r else "") for r in rows))
        if args.stock:
            print("SUMMARY stock / fast deployment wall time: " + ", ".join(
                f"K={r['k']}: {r['stock'] / r['fast']:.2f}" for r in rows))


if __name__ == "__main__":
    main()
