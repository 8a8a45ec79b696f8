"""The coordinator's Flower ServerApp: claims its run's ticket, runs that plan, writes the results.

What to run and where to write come from the run's ticket in the coordinator's home (:mod:`fedrad.server.tickets`),
never from the run config: a run nobody on the coordinator host submitted has no ticket and asks no site anything.
Requests are signed with the coordinator's key (``<home>/signing.key``) when it exists
(:mod:`fedrad.common.signing`). Run config (``flwr run --run-config``): ``expected-sites``, ``connect-timeout``,
``round-timeout``, ``poll-interval``, ``max-concurrent-sites``. A failed run leaves its reason in one line in
``<out dir>/failure.json`` and in ``progress.log``.
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


#: the file in the out dir where a failed run leaves its one-line reason (``fedrad study run`` prints it)
FAILURE_FILE = "failure.json"


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
    (out_dir / FAILURE_FILE).unlink(missing_ok=True)

    def log(line: str) -> None:  # visible in `flwr log` and, for fedrad's own CLI, in out-dir/progress.log
        print(line, flush=True)
        with open(progress, "a") as f:
            f.write(line + "\n")

    fed = Federation(FastGrid(grid, float(cfg.get("poll-interval", 0.05))),
                     timeout=float(cfg.get("round-timeout", 600.0)), log=log,
                     max_concurrent=int(cfg.get("max-concurrent-sites", 0)), signer=coordinator_signer(home))
    try:
        run_ticket(fed, ticket, cfg, out_dir)
    except Exception as exc:
        line = failure_text(exc, fed)
        log(f"coordinator: error: {line}")
        write_failure(out_dir, context.run_id, line)
        raise


def run_ticket(fed: Federation, ticket: dict, cfg, out_dir: Path) -> None:
    """Wait for the sites (saying how many are connected, and which are missing when their names are known),
    check that every site the plan names is connected, run the plan."""
    n = int(cfg.get("expected-sites", 1))
    expected = plan_sites(ticket["plan"])
    preload_task_modules()  # ~1.3 s of imports (study, report figures) while the sites are still connecting
    log = fed.log
    log(f"coordinator: waiting for {n} sites to connect")
    fed.wait_for_sites(n, timeout=float(cfg.get("connect-timeout", 120.0)), expected=expected)
    log(f"coordinator: {len(fed.node_ids())} sites connected")
    fed.check_site_names(expected)
    run_plan(fed, ticket["plan"], str(out_dir))


def plan_sites(plan_path: str) -> list[str]:
    """The site names a study plan's ``[sites]`` lists (empty: any site that connects)."""
    import json

    try:
        doc = json.loads(Path(plan_path).read_text())
    except (OSError, ValueError):
        return []
    return [str(s) for s in ((doc.get("config") or {}).get("sites") or {})]


def failure_text(exc: BaseException, fed: Federation) -> str:
    """A failed run's reason in one line: sites that failed or refused (with the next step), else the error."""
    from fedrad.server.federation import SiteError, failure_line

    if isinstance(exc, SiteError):
        return failure_line(exc, fed.plan_id)
    text = " ".join(str(exc).split())
    return text if text else type(exc).__name__


def write_failure(out_dir: Path, run_id: int, line: str) -> None:
    from fedrad.server.plans import write_json_atomic

    try:
        write_json_atomic({"run_id": int(run_id), "error": line}, out_dir / FAILURE_FILE)
    except OSError:
        pass  # `flwr log` still has the line
