"""The demo study on the deployment runtime against the same study in-process, measured in one run.

    python -m benchmarks.demo_runtime            # fast site runtime vs in-process
    python -m benchmarks.demo_runtime --stock    # and Flower's stock SuperNode too

Writes the demo cohort (``fedrad demo-data``: 5 hospitals x 100 patients, NIfTI images and masks) and runs
the demo's study (``fedrad.demo.DEMO_STUDY``) in two settings, each on every runtime:

1. *with extraction*: every site extracts its manifest with pyradiomics in the study's first round trip (fresh
   site folders, no feature cache), as ``fedrad demo`` does;
2. *on extracted tables*: each site holds the feature table setting 1 extracted, so the study is only the
   federated part (harmonization, selection, models, validation).

In-process is Flower's message layer with every site in this process (``fedrad.local.run_study_in_process``,
then the report):
sites answer one after another, so each site's extraction gets every core (``extract-jobs`` = cores), as the
deployment's sites together do (``fedrad demo``: cores // sites each, all sites at once). Deployment is a real
SuperLink and one SuperNode per site on loopback; its wall time runs from starting the processes to the
results file, so it includes process start-up, the ServerApp's start and the coordinator's report. Every
figure is printed as seconds and as a ratio to the in-process run of the same setting, and the results (every
site's external metrics, pooled metrics, selected signature, penalties) are compared between runtimes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path


def max_difference(a, b) -> tuple[float, str]:
    """Largest absolute difference between two results as results.json holds them, and where (0 when they are
    identical; inf when fields or any text differ)."""
    if a == b:
        return 0.0, ""
    from fedrad.server.study_pooled import flatten_metrics

    fa, fb = flatten_metrics(a), flatten_metrics(b)
    if fa.keys() != fb.keys():
        return math.inf, f"numeric fields {sorted(fa.keys() ^ fb.keys())[:5]}"
    where = max(fa, key=lambda k: abs(fa[k] - fb[k]), default="")
    diff = abs(fa[where] - fb[where]) if where else 0.0
    return (diff, where) if diff > 0 else (math.inf, "text (names, labels) differs")


COMPARED = ("external", "pooled", "selection", "signature", "penalties", "sites")


def digest(res: dict) -> dict:
    from fedrad.common.messages import to_plain

    return json.loads(json.dumps(to_plain({k: res.get(k) for k in COMPARED})))  # as results.json has it


def run_in_process(cfg: dict, nodes: list[dict], out: Path) -> tuple[dict, float]:
    """The study and its report (the deployment's ServerApp writes both)."""
    from fedrad.local import run_study_in_process
    from fedrad.server.report import write_report

    t0 = time.perf_counter()
    res = run_study_in_process(cfg, nodes)
    write_report(res, out / "report.html")
    return res, time.perf_counter() - t0


def run_deployment(cfg: dict, nodes: list[dict], root: Path, fast: bool) -> tuple[dict, float]:
    from benchmarks.rounds import run_deployment as deploy

    _, secs = deploy(cfg, nodes, root, fast=fast)
    return json.loads((root / "out" / "results.json").read_text()), secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--stock", action="store_true", help="also run Flower's stock SuperNode")
    args = ap.parse_args()
    from fedrad.client.demo_data import write_demo_cohort
    from fedrad.demo import study_config

    cores = os.cpu_count() or 1
    runtimes = ["fast"] + (["stock"] if args.stock else [])
    with tempfile.TemporaryDirectory(prefix="fedrad-demo-runtime-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_demo_cohort(root / "data", n_sites=args.sites, n_patients=args.patients, seed=0, progress=False)
        print(f"demo cohort: {args.sites} sites x {args.patients} patients written in "
              f"{time.perf_counter() - t0:.1f} s; {cores} cores", flush=True)
        names = [f"site{k}" for k in range(1, args.sites + 1)]
        manifests = {n: root / "data" / n / "manifest.csv" for n in names}
        summary = []
        for setting in ("with extraction", "on extracted tables"):
            times, results = {}, {}
            for runtime in ["in-process"] + runtimes:
                run_dir = root / setting.replace(" ", "-") / runtime
                cfg = study_config(manifests, "response", "ct-original", run_dir / "out")
                if setting == "with extraction":
                    jobs = cores if runtime == "in-process" else max(1, cores // args.sites)
                    nodes = [{"site-name": n, "workdir": str(run_dir / "sites" / n), "min-cell-size": 10,
                              "extract-jobs": jobs, "manifest": str(manifests[n]), "params": "ct-original"}
                             for n in names]
                else:  # the tables the in-process run with extraction wrote at each site
                    first = root / "with-extraction" / "in-process" / "sites"
                    nodes = [{"site-name": n, "workdir": str(run_dir / "sites" / n), "min-cell-size": 10,
                              "table": str(first / n / "features.parquet")} for n in names]
                if runtime == "in-process":
                    res, secs = run_in_process(cfg, nodes, run_dir)
                else:
                    res, secs = run_deployment(cfg, nodes, run_dir, fast=runtime == "fast")
                times[runtime], results[runtime] = secs, res
                line = f"demo study {setting}, {runtime:10s}: {res['round_trips']} round trips, wall time {secs:6.1f} s"
                if runtime != "in-process":
                    line += f" = {secs / times['in-process']:.2f} x in-process"
                    diff, where = max_difference(digest(results["in-process"]), digest(res))
                    line += (f"; results vs in-process: max |difference| {diff:.1e}"
                             + (f" at {where}" if diff > 0 else " (identical)"))
                print(line, flush=True)
            summary.append((setting, times))
        for setting, times in summary:
            print(f"SUMMARY demo study {setting}: deployment / in-process wall-time ratio "
                  + ", ".join(f"{r} {times[r] / times['in-process']:.2f} ({times[r]:.1f} s vs "
                              f"{times['in-process']:.1f} s)" for r in runtimes))


if __name__ == "__main__":
    main()
