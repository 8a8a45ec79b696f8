"""The coordinator's Flower ServerApp: claims its run's ticket, runs that plan, writes the results.

What to run and where to write come from the run's ticket in the coordinator's home (:mod:`fedrad.server.tickets`),
never from the run config: a run nobody on the coordinator host submitted has no ticket and asks no site anything.
Requests are signed with the coordinator's key (``<home>/signing.key``) when it exists
(:mod:`fedrad.common.signing`). Run config (``flwr run --run-config``): ``expected-sites``, ``connect-timeout``,
``round-timeout``, ``poll-interval``, ``max-concurrent-sites``.
"""
from __future__ import annotations

import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrad.server.federation import FastGrid, Federation, fast_object_pulls
from fedrad.server.plans import preload_task_modules, run_plan

app = ServerApp()


def coordinator_signer(home: str | None):
    """The coordinator's signer from its home, or None when it has no signing key (plans without a key)."""
    from fedrad.common.signing import KEY_FILE, Signer

    if home and (Path(home) / KEY_FILE).is_file():
        return Signer.load(Path(home))
    return None


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedrad.server import tickets

    cfg = context.run_config
    home = os.environ.get(tickets.HOME_ENV)
    ticket = tickets.claim(home, context.run_id)
    out_dir = Path(ticket["out_dir"])
    fast_object_pulls()
    progress = out_dir / "progress.log"
    progress.parent.mkdir(parents=True, exist_ok=True)
    progress.write_text("")  # this run's progress only (an earlier run into the same folder wrote its own)

    def log(line: str) -> None:  # visible in `flwr log` and, for fedrad's own CLI, in out-dir/progress.log
        print(line, flush=True)
        with open(progress, "a") as f:
            f.write(line + "\n")

    fed = Federation(FastGrid(grid, float(cfg.get("poll-interval", 0.05))),
                     timeout=float(cfg.get("round-timeout", 600.0)), log=log,
                     max_concurrent=int(cfg.get("max-concurrent-sites", 0)), signer=coordinator_signer(home))
    n = int(cfg.get("expected-sites", 1))
    preload_task_modules()  # ~1.3 s of imports (study, report figures) while the sites are still connecting
    log(f"coordinator: waiting for {n} sites to connect")
    fed.wait_for_sites(n, timeout=float(cfg.get("connect-timeout", 120.0)))
    log(f"coordinator: {len(fed.node_ids())} sites connected")
    run_plan(fed, ticket["plan"], str(out_dir))
