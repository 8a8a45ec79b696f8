"""An outsider with only the SuperLink's address and the public ``ca.crt`` tries the coordinator's study.

Real processes: ``fedrad coordinator start`` (TLS + node authentication, its own SuperExec with the SuperExec
secret, the Fleet API alone on the sites' port), three sites' SuperNodes with their node keys, a plan approved
at every site and naming the coordinator's signing key. The outsider

* calls the Control and Runtime APIs through the sites' port (``flwr ls``/``run``/``stop``, raw HTTPS): refused;
* starts its own SuperExec against the sites' port and, as a local user of the coordinator host would, against
  the control port without the secret: it never claims a ServerApp;
* submits fedrad's own app with the approved plan through the control port (a local user): the coordinator's
  ServerApp refuses a run without a ticket, no site is asked, no attempt is used;
* sends the sites requests of the approved plan without the coordinator's signature: refused (tests in
  tests/test_signed_requests.py).

Then the coordinator's own ``fedrad study run --home`` completes with every request signed.
"""
from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fedrad.server.runtime import (BIN, flower_env, free_port, start_supernode, wait_for_run, write_app,
                                   write_cli_connection)
from tests.test_study import make_sites


def _fedrad(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fedrad"), *map(str, args)], capture_output=True, text=True, **kwargs)


def _https(port: int, path: str, ca: Path) -> int:
    ctx = ssl.create_default_context(cafile=str(ca))
    req = urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=b"", method="POST",
                                 headers={"content-type": "application/protobuf"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _flwr(flwr_home: Path, *args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True, env=flower_env(flwr_home),
                          timeout=timeout)


def _wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def start_coordinator(tmp_path: Path):
    """``fedrad coordinator start`` with TLS + node auth on loopback (its CA key offline), in the background:
    ``(process, home, ca.crt, sites' port, control port)``; callers wait for its SuperExec and stop it."""
    from fedrad.server.certs import make_certificates

    certs = make_certificates(tmp_path / "certs")
    certs["ca_key"].unlink()  # the CA key is offline
    port, control = free_port(), free_port()
    home = tmp_path / "coord"
    coord = subprocess.Popen([str(BIN / "fedrad"), "coordinator", "start", "--home", str(home), "--certs",
                              str(tmp_path / "certs"), "--host", "127.0.0.1", "--port", str(port),
                              "--control-port", str(control)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    return coord, home, certs["ca_cert"], port, control


def test_an_outsider_cannot_claim_submit_stop_or_list_the_coordinators_runs(tmp_path):
    from fedrad.client.keys import make_node_keys
    from fedrad.common.plan import study_plan
    from fedrad.local import approve_at_sites
    from fedrad.server.study_config import load_study

    coord, home, ca, port, control = start_coordinator(tmp_path)
    procs, outsider_exec = [], None
    try:
        _wait_for(lambda: (home / "superexec" / "superexec.log").is_file(), 90, "the coordinator's SuperExec")
        keys = _fedrad("coordinator", "keys", "--home", home)
        assert keys.returncode == 0, keys.stderr
        _, nodes, _ = make_sites(tmp_path / "sites", survival=False)
        nodes = nodes[:3]
        study = _write_study(tmp_path / "study.toml", keys.stdout, [n["site-name"] for n in nodes])
        cfg = load_study(study)
        for node in nodes:
            priv, pub = make_node_keys(Path(node["workdir"]).parent / "keys")
            reg = _fedrad("coordinator", "register-site", pub, "--name", node["site-name"], "--home", home,
                          timeout=120)
            assert reg.returncode == 0, reg.stdout + reg.stderr
            procs.append(start_supernode(Path(node["workdir"]).parent / "node", node["site-name"],
                                         f"127.0.0.1:{port}", free_port(), node, root_certificates=ca,
                                         auth_key=priv))
        pid = approve_at_sites(study_plan(cfg), nodes)

        # 1. the sites' port serves the Fleet API only, to anyone
        assert _https(port, "/v1/control/list-runs", ca) == 404
        assert _https(port, "/v1/runtime/acquire-task", ca) == 404
        assert _https(control, "/v1/control/list-runs", ca) != 404  # the coordinator host's own port
        outsider = tmp_path / "outsider"
        write_cli_connection(outsider, "target", f"127.0.0.1:{port}", ca)
        for args in (("ls", "target"), ("stop", "1", "target"), ("run", str(write_app(tmp_path / "app")), "target")):
            out = _flwr(outsider, *args, "--format", "json")  # flwr exits 0 on failure with --format json
            doc = json.loads(out.stdout[out.stdout.find("{"):])
            assert doc["success"] is False and "Not Found" in doc["error-message"], (args, out.stdout)

        # 2. an outsider's SuperExec, on the sites' port and (a local user) on the control port without the secret
        outsider_exec = [subprocess.Popen([str(BIN / "flower-superexec"), "--runtime-api-address", f"127.0.0.1:{p}",
                                           "--root-certificates", str(ca)],
                                          stdout=open(tmp_path / f"outsider-exec-{p}.log", "w"),
                                          stderr=subprocess.STDOUT, env=flower_env(tmp_path / f"ox{p}",
                                          FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.01"), start_new_session=True)
                         for p in (port, control)]

        # 3. a local outsider submits fedrad's app with the approved plan through the control port
        (tmp_path / "plan.json").write_text(json.dumps({"task": "study", "config": cfg}))
        local_user = tmp_path / "local-user"
        write_cli_connection(local_user, "fedrad", f"127.0.0.1:{control}", ca)
        sub = _flwr(local_user, "run", str(write_app(tmp_path / "app")), "fedrad", "--format", "json",
                    "--run-config", 'expected-sites=3', timeout=300)
        run = json.loads(sub.stdout[sub.stdout.find("{"):])["run-id"]
        with pytest.raises(Exception, match="no ticket"):
            wait_for_run(local_user, "fedrad", int(run), timeout=120, poll=2.0)
        for node in nodes:  # no site was asked anything, no attempt used
            work = Path(node["workdir"])
            assert not (work / "ledger" / f"{pid}.json").exists()
            assert not (work / "audit.jsonl").exists()

        # 4. the coordinator's own study completes, every request signed; the outsider's SuperExecs got nothing
        res = _fedrad("study", "run", study, "--home", home, "--timeout", "600", timeout=900)
        assert res.returncode == 0, res.stdout + res.stderr
        results = json.loads((tmp_path / "results" / "results.json").read_text())
        assert results["plan_id"] == pid and sorted(results["sites"]) == [n["site-name"] for n in nodes]
        for node in nodes:
            sessions = list((Path(node["workdir"]) / "sessions").glob("*.json"))
            assert len(sessions) == 1 and json.loads(sessions[0].read_text())["plan"] == pid
            assert json.loads((Path(node["workdir"]) / "ledger" / f"{pid}.json").read_text())["attempts"] == 1
        assert "404 Not Found" in (tmp_path / f"outsider-exec-{port}.log").read_text()
        assert "SuperExec authentication failed" in (home / "superlink" / "superlink.log").read_text()
        assert [proc.poll() is not None for proc in outsider_exec] == [True, True]  # both gave up, none claimed
    finally:
        for proc in outsider_exec or []:
            proc.kill()
        for proc in procs:
            proc.stop()
        os.killpg(coord.pid, signal.SIGTERM)
        try:
            coord.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(coord.pid, signal.SIGKILL)


def _write_study(path: Path, coordinator_table: str, sites: list[str]) -> Path:
    """The study of tests.test_study.make_sites (response endpoint, fixed grid) on ``sites``, signed."""
    path.write_text(f"""{coordinator_table.strip()}
[study]
name = "outsider"
min_sites = 3
output = "results"
[endpoint]
type = "response"
outcome = "response"
[harmonization]
covariates = ["age", "sex"]
categorical = ["sex"]
[selection]
exclude = ["response", "os_*", "immune_score", "egfr_mutant"]
[model]
clinical = ["age", "stage"]
grid = [0.01, 0.1, 1.0]
""" + "".join(f"[sites.{s}]\n" for s in sites))
    return path
