"""``python -m fedrad.server.superexec [flower-superexec arguments]``: Flower's own SuperExec, which also reaps
the ServerApp processes it started.

Flower 1.42's SuperExec starts each run's ``flwr-serverapp`` with ``subprocess.Popen`` and drops the object
without waiting for it: a finished ServerApp stays a ``<defunct>`` process until the next run is launched
(Python reaps dropped children only when it creates the next one). The coordinator's SuperExec lives as long as
the coordinator, so after a failed or stopped study its ServerApp would show in ``ps`` for days. A daemon thread
here reaps exactly those dropped children (``subprocess``'s own list of them) every second; children Flower still
waits for are untouched. Arguments and behaviour are otherwise Flower's ``flower-superexec``.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time

#: seconds between two reaps of the SuperExec's finished children
REAP_SECONDS = 1.0


def reap_dropped_children(interval: float = REAP_SECONDS) -> None:
    """Forever: wait for every finished child whose ``Popen`` object was dropped (``subprocess._cleanup``)."""
    cleanup = getattr(subprocess, "_cleanup", None)
    if cleanup is None:  # another Python: nothing to reap with, the children stay until Python's next Popen
        return
    while True:
        time.sleep(interval)
        cleanup()


def main() -> None:
    threading.Thread(target=reap_dropped_children, daemon=True, name="fedrad-reaper").start()
    from flwr.supercore.cli import flower_superexec

    sys.argv[0] = "flower-superexec"
    sys.exit(flower_superexec())


if __name__ == "__main__":
    main()
