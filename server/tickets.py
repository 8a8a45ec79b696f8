"""Run tickets: the coordinator's ServerApp runs only the runs its own operator submitted.

Whoever can reach a SuperLink's Control API can submit fedrad's app with a run config of their choosing, and the
coordinator's SuperExec then starts fedrad's ServerApp for it on the coordinator host. So the ServerApp takes
nothing from the run config that says what to run or where to write: it waits for a *ticket* for its Flower run
id in the coordinator's home (``$FEDRAD_COORDINATOR_HOME/tickets/<run id>.json``, folder 0700, file 0600),
written by the command that submitted the run (``fedrad study run``, a loopback deployment, a simulation) once
``flwr run`` returned the id. The ticket names the plan file and the output folder; the ServerApp claims it
(an atomic rename, so it is used once) and refuses to run without one. A run submitted by anyone else has no
ticket: its ServerApp exits before asking any site anything. The submitter announces itself before ``flwr
run`` (a ``pending-*`` file), so a ServerApp that finds neither its ticket nor a submission in flight refuses at
once instead of waiting.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

#: environment variable naming the coordinator's home (set for the SuperLink and its SuperExec)
HOME_ENV = "FEDRAD_COORDINATOR_HOME"
#: seconds a ServerApp waits for its ticket (the submitter writes it right after ``flwr run`` returns)
CLAIM_SECONDS = 60.0


class TicketError(RuntimeError):
    """No valid ticket for this run: the message says why and what to do."""


def _dir(home: Path, name: str) -> Path:
    d = Path(home) / name
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    return d


#: a pending submission older than this is stale (its submitter died before writing the ticket)
PENDING_SECONDS = 300.0


def announce(home: Path) -> Path:
    """Mark a submission in flight (before ``flwr run``); :func:`issue` removes the mark."""
    d = _dir(home, "tickets")
    path = d / f"pending-{os.getpid()}-{time.monotonic_ns()}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    return path


def _in_flight(home: Path) -> bool:
    now = time.time()
    for path in (Path(home) / "tickets").glob("pending-*"):
        try:
            if now - path.stat().st_mtime < PENDING_SECONDS:
                return True
        except FileNotFoundError:
            continue
    return False


def issue(home: Path, run_id: int, plan: Path, out_dir: Path, pending: Path | None = None) -> Path:
    """Write the ticket of run ``run_id``: the plan file to run and the folder for its results."""
    doc = {"run_id": int(run_id), "plan": str(Path(plan).resolve()), "out_dir": str(Path(out_dir).resolve())}
    d = _dir(home, "tickets")
    tmp = d / f".{int(run_id)}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    path = d / f"{int(run_id)}.json"
    os.replace(tmp, path)
    if pending is not None:
        Path(pending).unlink(missing_ok=True)
    return path


def claim(home: str | Path | None, run_id: int, timeout: float = CLAIM_SECONDS) -> dict:
    """The ticket of run ``run_id`` (waits up to ``timeout`` s for it), moved to ``claimed/`` so it is used once."""
    if not home:
        raise TicketError(f"this ServerApp runs only under a fedrad coordinator ({HOME_ENV} is not set): start the "
                          "SuperLink with `fedrad coordinator start` and submit with `fedrad study run`")
    src = Path(home) / "tickets" / f"{int(run_id)}.json"
    dst = _dir(home, "claimed") / src.name
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rename(src, dst)  # atomic: a second claim of the same ticket finds nothing
            break
        except FileNotFoundError:
            if time.monotonic() > deadline or not _in_flight(home):
                raise TicketError(f"run {run_id} has no ticket in {Path(home) / 'tickets'} after {timeout:.0f} s: "
                                  "it was not submitted by this coordinator's `fedrad study run`; not running it")
            time.sleep(0.05)
    doc = json.loads(dst.read_text())
    if int(doc.get("run_id", -1)) != int(run_id) or not doc.get("plan") or not doc.get("out_dir"):
        raise TicketError(f"the ticket of run {run_id} is malformed ({dst})")
    return doc
