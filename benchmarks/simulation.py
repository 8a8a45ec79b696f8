"""A whole study with many virtual sites on Flower's simulation engine (Ray): ``--sites 50`` by default.

Each virtual SuperNode is a site (``site1..siteN`` from its partition id) with its own synthetic feature table
(each virtual site's site.toml names its table; work directories under the run's ``sim-root``). The same ServerApp and
ClientApp as the deployment runtime run the same protocol; only the runtime differs. Prints the round trips,
the wall time and the headline metrics.

    python benchmarks/simulation.py --sites 50
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.rounds import make_sites
from fedrad.server.plans import write_json_atomic
from fedrad.server.report import headline
from fedrad.server.runtime import SimulationRun


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=50)
    ap.add_argument("--patients", type=int, default=60)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="fedrad-sim-"))
    cfg, nodes = make_sites(root / "tables", args.sites, n=args.patients)
    cfg["sites"] = {f"site{i + 1}": {"table": n["table"]} for i, n in enumerate(nodes)}
    cfg["validation"]["inner_folds"] = 2
    write_json_atomic({"task": "study", "config": cfg}, root / "plan.json")
    out = root / "results"
    t0 = time.perf_counter()
    from fedrad.local import write_simulation_sites

    write_simulation_sites(cfg, root / "flower" / "sites")
    with SimulationRun(root / "flower", args.sites) as sim:
        run_id = sim.submit({"plan": str(root / "plan.json"), "out-dir": str(out), "expected-sites": args.sites,
                             "round-timeout": 3600.0})
        print(f"simulation: {args.sites} virtual sites, Flower run {run_id}")
        sim.wait(run_id, timeout=7200, done_file=out / "results.json")
    res = json.loads((out / "results.json").read_text())
    print(f"{args.sites} sites x {args.patients} patients: {res['round_trips']} round trips, study "
          f"{res['seconds']:.0f} s, wall time {time.perf_counter() - t0:.0f} s (simulation runtime)")
    for line in headline(res):
        print(line)


if __name__ == "__main__":
    main()
