"""Round trips and wall time of a whole study for K = 3, 5, 10 sites: rounds must not grow with K.

Every phase sends one message per site carrying all validation folds (K + 1 of them), so K only changes what
each message holds, not how many round trips there are. Sites hold synthetic feature tables (120 patients,
9 radiomic features + volume + clinical covariates, site-specific scanner shifts).

    python benchmarks/rounds.py                       # in-process Flower message layer (fast)
    python benchmarks/rounds.py --runtime deployment  # real SuperLink + K SuperNodes on loopback (slow on
                                                      # 2 cores: one ClientApp process per site and round)
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


def run_deployment(cfg, nodes, root: Path) -> tuple[int, float]:
    from fedrad.server.plans import write_json_atomic
    from fedrad.server.runtime import LoopbackDeployment, SiteNode

    write_json_atomic({"task": "study", "config": cfg}, root / "plan.json")
    sites = [SiteNode(n["site-name"], {k: v for k, v in n.items() if k != "site-name"}) for n in nodes]
    from fedrad.local import approve_plan_file_at_sites

    approve_plan_file_at_sites(root / "plan.json", nodes)  # each site's operator approves the published plan
    t0 = time.perf_counter()
    with LoopbackDeployment(root / "flower", sites) as dep:
        run_id = dep.submit({"plan": str(root / "plan.json"), "out-dir": str(root / "out"),
                             "expected-sites": len(nodes), "round-timeout": 900.0})
        dep.wait(run_id, timeout=3600, done_file=root / "out" / "results.json")
    res = json.loads((root / "out" / "results.json").read_text())
    return res["round_trips"], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", choices=["local", "deployment"], default="local")
    ap.add_argument("--sites", default="3,5,10", help="comma-separated K values")
    args = ap.parse_args()
    rows = []
    for k in [int(x) for x in args.sites.split(",")]:
        with tempfile.TemporaryDirectory(prefix=f"fedrad-rounds-{k}-") as tmp:
            cfg, nodes = make_sites(Path(tmp), k)
            rounds, secs = run_local(cfg, nodes) if args.runtime == "local" else run_deployment(cfg, nodes, Path(tmp))
        rows.append((k, rounds, secs))
        print(f"K = {k:2d} sites: {rounds} round trips, study wall time {secs:.1f} s ({args.runtime} runtime)")
    base_rounds, base_secs = rows[0][1], rows[0][2]
    for k, rounds, secs in rows[1:]:
        print(f"K = {k} vs K = {rows[0][0]}: round trips x{rounds / base_rounds:.2f}, wall time x{secs / base_secs:.2f}")


if __name__ == "__main__":
    main()
