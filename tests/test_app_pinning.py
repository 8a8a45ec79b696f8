"""Issue 11, attack 1, on real processes: an outsider who can reach the SuperLink submits their own Flower app
with ``flwr run``. SuperNodes started by ``fedrad site join`` refuse it with an error reply before any of its
code is unpacked or imported, log the refusal, and still run fedrad's own app right after."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fedrad.server.runtime import (BIN, flwr_run, free_port, start_superlink, wait_for_port, wait_for_run,
                                   write_app, write_cli_connection)
from tests.test_harmonize_flower import _table

FOREIGN_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "table-grabber"
version = "1.0.0"
description = "an outsider's app"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "outsider"

[tool.flwr.app.components]
serverapp = "grabber.server_app:app"
clientapp = "grabber.client_app:app"

[tool.flwr.app.config]
out = ""
"""

FOREIGN_CLIENT = """\
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

Path({marker!r}).write_text("foreign ClientApp imported")  # runs on import: must never happen at a site
app = ClientApp()


@app.query("grab")
def grab(msg, context):
    table = str(context.node_config.get("table", ""))
    Path({marker!r}).write_text("foreign ClientApp ran")
    return Message(RecordDict({{"loot": ConfigRecord({{"table": Path(table).read_bytes().hex() if table else ""}})}}),
                   reply_to=msg)
"""

FOREIGN_SERVER = """\
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    deadline = time.monotonic() + 60
    while len(grid.get_node_ids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    nodes = list(grid.get_node_ids())
    msgs = [Message(RecordDict({"q": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="query.grab")
            for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=90))
    out = [{"error": r.has_error(), "code": r.error.code if r.has_error() else None,
            "reason": r.error.reason if r.has_error() else None,
            "content": sorted(r.content.keys()) if r.has_content() else None} for r in replies]
    Path(str(context.run_config["out"])).write_text(json.dumps({"nodes": len(nodes), "replies": out}))
"""


def _foreign_app(root, marker):
    app = root / "foreign"
    (app / "grabber").mkdir(parents=True)
    (app / "pyproject.toml").write_text(FOREIGN_PYPROJECT)
    (app / "grabber" / "__init__.py").write_text("")
    (app / "grabber" / "client_app.py").write_text(FOREIGN_CLIENT.format(marker=str(marker)))
    (app / "grabber" / "server_app.py").write_text(FOREIGN_SERVER)
    return app


def _site_join(root, name, table, superlink):
    """``fedrad site join`` exactly as a site runs it (loopback, so --insecure is allowed)."""
    work = root / "sites" / name
    cmd = [str(BIN / "fedrad"), "site", "join", "--superlink", superlink, "--name", name, "--table", str(table),
           "--workdir", str(work), "--port", str(free_port()), "--min-cell-size", "10", "--insecure"]
    log = open(root / f"join-{name}.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    log.close()
    return proc, work


def test_foreign_fab_is_refused_and_fedrad_still_runs(tmp_path):
    t0 = time.monotonic()
    df = _table(seed=11)
    df = df[df.site.isin(["hospA", "hospB"])]
    feats = [c for c in df.columns if c.startswith("original_")]
    tables = {}
    for name, part in df.groupby("site"):
        d = tmp_path / "hospitals" / name
        d.mkdir(parents=True)
        part.to_parquet(d / "features.parquet", index=False)
        tables[name] = d / "features.parquet"
    marker = tmp_path / "PWNED"
    port = free_port()
    address = f"127.0.0.1:{port}"
    link = start_superlink(tmp_path / "link", port=port)
    joins = []
    try:
        wait_for_port("127.0.0.1", port, link, 60)
        joins = [_site_join(tmp_path, name, table, address) for name, table in tables.items()]
        cli = tmp_path / "outsider-cli"
        write_cli_connection(cli, "target", address)

        # 1. the outsider's app: every site answers with an error, nothing of the app runs or is unpacked
        out = tmp_path / "foreign-result.json"
        run_id = flwr_run(_foreign_app(tmp_path, marker), cli, "target", {"out": str(out)})
        wait_for_run(cli, "target", run_id, timeout=150, poll=2.0, done_file=out)
        result = json.loads(out.read_text())
        assert result["nodes"] == 2 and len(result["replies"]) == 2, result
        for reply in result["replies"]:
            assert reply["error"] and reply["content"] is None, reply
            assert reply["code"] == 2 and "UntrustedApp" in reply["reason"], reply
            assert "extra: grabber/__init__.py, grabber/client_app.py" in reply["reason"], reply
        assert not marker.exists(), "the foreign ClientApp was imported at a site"
        for name in tables:
            work = tmp_path / "sites" / name
            refusals = (work / "flower" / "refused-apps.log").read_text()
            assert f"REFUSED app outsider/table-grabber 1.0.0 (run {run_id})" in refusals
            assert "fedrad app pinning REFUSED" in (work / "flower" / "supernode.log").read_text()
            assert not list((work / "flower").glob("apps/outsider*")), "the foreign FAB was unpacked"
            assert not (work / "audit.jsonl").exists()  # the site answered nothing

        # 2. fedrad's own app on the same SuperNodes: federated ComBat (2 round trips)
        from fedrad.common.combat import make_request

        plan = tmp_path / "plan.json"
        plan.write_text(json.dumps({"task": "harmonize", "request": make_request(feats, ["age"], min_cell_size=10)}))
        for name in tables:  # each site's operator approves the published plan with the real command
            ok = subprocess.run([str(BIN / "fedrad"), "site", "approve", str(plan), "--workdir",
                                 str(tmp_path / "sites" / name), "--yes"], capture_output=True, text=True, timeout=60)
            assert ok.returncode == 0 and "approved plan" in ok.stdout, ok.stdout + ok.stderr
        res_dir = tmp_path / "results"
        write_cli_connection(tmp_path / "coord-cli", "fedrad", address)
        run_id = flwr_run(write_app(tmp_path / "app"), tmp_path / "coord-cli", "fedrad",
                          {"plan": str(plan), "out-dir": str(res_dir), "expected-sites": 2, "round-timeout": 90.0},
                          ticket_home=tmp_path / "link")
        status = wait_for_run(tmp_path / "coord-cli", "fedrad", run_id, timeout=150, poll=2.0,
                              done_file=res_dir / "results.json")
        assert status["status"] == "finished:completed"
        results = json.loads((res_dir / "results.json").read_text())
        assert sorted(results["sites"]) == ["hospA", "hospB"] and results["round_trips"] == 2
        for name in tables:  # the fedrad app was never refused, only the foreign one
            assert (tmp_path / "sites" / name / "flower" / "refused-apps.log").read_text().count("REFUSED") == 1
        assert not marker.exists()
        for proc, _ in joins:
            assert proc.poll() is None, "a site join exited"
    finally:
        for proc, _ in joins:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in joins:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        link.stop()
    print(f"app pinning end-to-end: {time.monotonic() - t0:.1f} s", file=sys.stderr)
