"""``fedrad study run`` on the deployment runtime, as a coordinator's operator meets it: real processes.

``fedrad coordinator start`` (TLS + node authentication), three registered sites whose SuperNodes are started
one by one, and the real ``fedrad study run --home`` in a subprocess:

* started while sites are missing, it says how many are connected and which are missing, and the connect
  timeout ends it in one line naming them;
* its own ``--timeout`` stops the run on the SuperLink;
* a site name no node has, and a plan changed after the sites approved it, each end in one line naming what to do;
* a study that loses a site streams its rounds, the lost site with its reason and the restart, and completes;
* ``fedrad coordinator status`` names the registered sites, online or not, and lists the runs with their state.

After every failed run no ``flwr-serverapp`` (not even a ``<defunct>`` one) is left under the coordinator.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from fedrad.server.runtime import free_port, start_supernode
from tests.test_outsider import _fedrad, _wait_for, _write_study, start_coordinator
from tests.test_study import make_sites


def _descendants(pid: int) -> list[tuple[int, str, str]]:
    """(pid, state, command line) of every process below ``pid``."""
    children: dict[int, list[int]] = {}
    info = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
        info[int(entry)] = (fields[0], cmd or stat.split("(", 1)[1].split(")", 1)[0])
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append((child, *info[child]))
            todo.append(child)
    return out


def _serverapps(coord: subprocess.Popen) -> list:
    return [p for p in _descendants(coord.pid) if "serverapp" in p[2] or (p[1] == "Z")]


def _no_serverapp_left(coord):
    try:
        _wait_for(lambda: not _serverapps(coord), 30, "the ServerApp to end")
    except AssertionError:
        raise AssertionError(f"left behind: {_serverapps(coord)}") from None


@pytest.mark.slow  # ~2 min of real processes; the default suite's real coordinator runs: test_outsider, test_walkthrough
def test_study_run_streams_progress_names_missing_sites_and_leaves_no_serverapp(tmp_path):
    from fedrad.client.keys import make_node_keys
    from fedrad.common.plan import plan_id, study_plan
    from fedrad.local import approve_at_sites
    from fedrad.server.study_config import load_study

    coord, home, ca, port, control = start_coordinator(tmp_path)
    procs = {}
    try:
        _wait_for(lambda: (home / "superexec" / "superexec.log").is_file(), 90, "the coordinator's SuperExec")
        keys = _fedrad("coordinator", "keys", "--home", home)
        assert keys.returncode == 0, keys.stderr
        _, nodes, _ = make_sites(tmp_path / "sites", survival=False)
        nodes = [{**n, "site-name": f"site{i + 1}"} for i, n in enumerate(nodes[:3])]
        names = [n["site-name"] for n in nodes]
        study = _write_study(tmp_path / "study.toml", keys.stdout, names)
        study.write_text(study.read_text().replace("min_sites = 3", "min_sites = 2"))
        cfg = load_study(study)
        auth = {}
        for node in nodes:
            auth[node["site-name"]] = make_node_keys(Path(node["workdir"]).parent / "keys")
            reg = _fedrad("coordinator", "register-site", auth[node["site-name"]][1], "--name", node["site-name"],
                          "--home", home, timeout=120)
            assert reg.returncode == 0, reg.stdout + reg.stderr
        pid = approve_at_sites(study_plan(cfg), nodes)
        broken = Path(nodes[2]["table"])  # site3 cannot compute: a text age column
        d = pd.read_parquet(broken)
        d["age"] = d["age"].map(lambda a: f"{a:.0f} years")
        d.to_parquet(broken)

        def join(node):
            procs[node["site-name"]] = start_supernode(
                Path(node["workdir"]).parent / "node", node["site-name"], f"127.0.0.1:{port}", free_port(), node,
                root_certificates=ca, auth_key=auth[node["site-name"]][0])

        def run(*extra, path=study):
            return _fedrad("study", "run", path, "--home", home, *extra, timeout=900)

        # 1. no site yet, then one: progress says so; the connect timeout ends it in one line
        res = run("--connect-timeout", "4")
        assert res.returncode == 1, res.stderr
        assert "waiting for sites: 0 of 3 connected" in res.stderr
        assert res.stderr.strip().splitlines()[-1].startswith("fedrad: error: only 0 of 3 connected after 4 s")
        _no_serverapp_left(coord)
        join(nodes[0])
        _wait_for(lambda: "SuperNode ID" in procs["site1"].log.read_text(), 60, "site1 to connect")
        status = _fedrad("coordinator", "status", "--home", home, timeout=120)
        assert status.returncode == 0, status.stderr
        lines = status.stdout.splitlines()
        assert lines[0] == "sites: 1 of 3 online", status.stdout
        assert re.match(r"  site1 +node \d+ +online +online since 20", lines[1]), lines
        assert re.match(r"  site2 +node \d+ +registered +never connected", lines[2]), lines
        res = run("--connect-timeout", "8")
        assert res.returncode == 1
        assert "0 of 3 connected" not in res.stderr  # the earlier run's progress is not shown again
        assert "waiting for sites: 1 of 3 connected (site2, site3 missing)" in res.stderr, res.stderr
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("fedrad: error: only 1 of 3 connected (site2, site3 missing) after 8 s: start "
                               "`fedrad site join`"), last
        _no_serverapp_left(coord)

        # 2. the study's own --timeout: its run is stopped on the SuperLink
        t0 = time.monotonic()
        res = run("--timeout", "10")
        assert res.returncode == 1 and time.monotonic() - t0 < 120
        last = res.stderr.strip().splitlines()[-1]
        assert re.match(r"fedrad: error: run \d+ did not finish within 10 s \(--timeout\); stopped it on the "
                        r"SuperLink \(finished:stopped\)", last), last
        _no_serverapp_left(coord)

        join(nodes[1])
        join(nodes[2])
        # 3. a misspelt site name: nothing is asked
        typo = tmp_path / "typo.toml"
        typo.write_text(study.read_text().replace("[sites.site3]", "[sites.stie3]"))
        res = run(path=typo)
        assert res.returncode == 1
        assert res.stderr.strip().splitlines()[-1] == ("fedrad: error: no site named stie3 is connected (connected: "
                                                       "site1, site2, site3); check [sites] in study.toml")
        _no_serverapp_left(coord)

        # 4. the plan changed after the sites approved it
        changed = tmp_path / "changed.toml"
        changed.write_text(study.read_text().replace("grid = [0.01, 0.1, 1.0]", "grid = [0.1, 1.0]"))
        new_pid = plan_id(study_plan(load_study(changed)))
        res = run(path=changed)
        assert res.returncode == 1
        lines = res.stderr.strip().splitlines()
        assert lines[-1] == (f"fedrad: error: site1, site2, site3 refused study plan {new_pid[:12]}: not the plan "
                             "they approved (study.toml changed since, or not approved yet); ask each site to run "
                             "`fedrad site approve study.toml --config site.toml`, then run the study again"), lines
        assert "Traceback" not in res.stderr and sum("fedrad: error" in line for line in lines) == 1
        _no_serverapp_left(coord)

        # 5. the approved study: site3 is lost (its data), the study restarts with two and completes
        res = run("--timeout", "600")
        assert res.returncode == 0, res.stderr[-3000:]
        err = res.stderr
        assert "coordinator: 3 sites connected" in err
        assert re.search(r"round 1 \(prepare\): 3 of 3 sites answered", err)
        assert re.search(r"site site3 lost: could not compute its reply from its data", err)
        assert "site(s) site3 failed during combat_stats; restarting the study with the 2 remaining sites" in err
        assert re.search(r"phase evaluation done", err)
        results = json.loads((tmp_path / "results" / "results.json").read_text())
        assert results["plan_id"] == pid and list(results["missing_sites"]) == ["site3"]
        _no_serverapp_left(coord)
        status = _fedrad("coordinator", "status", "--home", home, timeout=120)
        assert status.returncode == 0 and status.stdout.startswith("sites: 3 of 3 online\n"), status.stdout
        runs = [line for line in status.stdout.splitlines() if line.startswith("  run ")]
        assert len(runs) == 6 and status.stdout.splitlines()[4] == "runs: 6", status.stdout
        assert re.search(r"finished:completed +study 'outsider'", runs[-1]), runs
        assert re.search(r"finished:stopped +study 'outsider'", runs[2]), runs
        assert sum("finished:failed" in r for r in runs) == 4, runs
    finally:
        for proc in procs.values():
            proc.stop()
        os.killpg(coord.pid, signal.SIGTERM)
        try:
            coord.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(coord.pid, signal.SIGKILL)
