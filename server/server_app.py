"""The coordinator's Flower ServerApp: loads the plan the coordinator wrote, runs it, writes the results.

Run config (``flwr run --run-config``): ``plan`` (path of the plan JSON on the SuperLink host), ``out-dir``
(where results.json is written — by the ServerApp itself, since open-source Flower has no ``flwr pull``),
``expected-sites``, ``connect-timeout``, ``round-timeout``, ``poll-interval``.
"""
from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrad.server.federation import FastGrid, Federation, fast_object_pulls
from fedrad.server.plans import preload_task_modules, run_plan

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    fast_object_pulls()
    progress = Path(str(cfg["out-dir"])) / "progress.log"
    progress.parent.mkdir(parents=True, exist_ok=True)
    progress.write_text("")  # this run's progress only (an earlier run into the same folder wrote its own)

    def log(line: str) -> None:  # visible in `flwr log` and, for fedrad's own CLI, in out-dir/progress.log
        print(line, flush=True)
        with open(progress, "a") as f:
            f.write(line + "\n")

    fed = Federation(FastGrid(grid, float(cfg.get("poll-interval", 0.05))),
                     timeout=float(cfg.get("round-timeout", 600.0)), log=log,
                     max_concurrent=int(cfg.get("max-concurrent-sites", 0)))
    n = int(cfg.get("expected-sites", 1))
    preload_task_modules()  # ~1.3 s of imports (study, report figures) while the sites are still connecting
    log(f"coordinator: waiting for {n} sites to connect")
    fed.wait_for_sites(n, timeout=float(cfg.get("connect-timeout", 120.0)))
    log(f"coordinator: {len(fed.node_ids())} sites connected")
    run_plan(fed, str(cfg["plan"]), str(cfg["out-dir"]))
