"""TLS + node authentication on real processes: our certificates and keys with Flower's SuperLink/SuperNode.
A registered site's SuperNode connects; an unregistered key is refused."""
from __future__ import annotations

import json
import subprocess
import time

from fedrad.client.keys import make_node_keys
from fedrad.server.certs import make_certificates
from fedrad.server.runtime import (BIN, flower_env, free_port, start_superlink, start_supernode, wait_for_port,
                                   write_cli_connection)


def test_registered_site_connects_and_unregistered_key_is_refused(tmp_path):
    certs = make_certificates(tmp_path / "certs")
    good_key, good_pub = make_node_keys(tmp_path / "good")
    bad_key, _ = make_node_keys(tmp_path / "bad")
    port = free_port()
    tls = {"ca": certs["ca_cert"], "cert": certs["server_cert"], "key": certs["server_key"]}
    link = start_superlink(tmp_path / "link", port=port, database=tmp_path / "state.db", tls=tls, node_auth=True)
    nodes = []
    try:
        wait_for_port("127.0.0.1", port, link, 60)
        write_cli_connection(tmp_path / "cli", "fedrad", f"127.0.0.1:{port}", certs["ca_cert"])
        reg = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(good_pub), "fedrad", "--name", "site1"],
                             capture_output=True, text=True, env=flower_env(tmp_path / "cli"), timeout=120)
        assert reg.returncode == 0, reg.stdout + reg.stderr
        bad = start_supernode(tmp_path / "bad-node", "intruder", f"127.0.0.1:{port}", free_port(),
                              {"site-name": "intruder"}, root_certificates=certs["ca_cert"], auth_key=bad_key)
        good = start_supernode(tmp_path / "good-node", "site1", f"127.0.0.1:{port}", free_port(),
                               {"site-name": "site1"}, root_certificates=certs["ca_cert"], auth_key=good_key)
        nodes += [bad, good]
        deadline = time.monotonic() + 90
        while bad.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not bad.alive(), "a SuperNode with an unregistered key was not refused"
        assert bad.popen.returncode != 0
        assert good.alive()
        registered = []
        while time.monotonic() < deadline:  # the registered site's node comes online (and only that one)
            ls = subprocess.run([str(BIN / "flwr"), "supernode", "ls", "fedrad", "--format", "json"],
                                capture_output=True, text=True, env=flower_env(tmp_path / "cli"), timeout=120)
            registered = json.loads(ls.stdout[ls.stdout.find("{"):])["nodes"]
            if registered and registered[0].get("online-at") not in (None, "N/A"):
                break
            time.sleep(1)
        assert len(registered) == 1 and registered[0].get("online-at") not in (None, "N/A"), registered
    finally:
        for proc in nodes + [link]:
            proc.stop()


def test_a_run_over_tls_and_node_auth_goes_through_the_fast_site_runtime(tmp_path):
    """Federated ComBat on two registered sites over TLS + SuperNode authentication: every message runs as a
    ClientApp forked from the site's zygote, the SuperExec is woken by the doorbell (no fallback notice), and
    the harmonized tables equal pooled ComBat (neuroCombat-equivalent, tests/test_combat.py)."""
    import numpy as np
    import pandas as pd

    from fedrad.common.combat import ComBat, make_request
    from fedrad.local import approve_plan_file_at_sites
    from fedrad.server.runtime import RuntimeFailure, flwr_run, wait_for_run, write_app
    from tests.test_harmonize_flower import _table

    certs = make_certificates(tmp_path / "certs")
    df = _table(seed=11)
    df = df[df.site.isin(["hospA", "hospC"])]
    feats = [c for c in df.columns if c.startswith("original_")]
    port = free_port()
    tls = {"ca": certs["ca_cert"], "cert": certs["server_cert"], "key": certs["server_key"]}
    link = start_superlink(tmp_path / "link", port=port, tls=tls, node_auth=True)
    plan = {"task": "harmonize", "request": make_request(feats, ["age", "sex"], ["sex"], min_cell_size=10)}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    configs, nodes = {}, []
    try:
        wait_for_port("127.0.0.1", port, link, 60)
        write_cli_connection(tmp_path / "cli", "fedrad", f"127.0.0.1:{port}", certs["ca_cert"])
        for name, part in df.groupby("site"):
            work = tmp_path / name
            work.mkdir()
            part.to_parquet(work / "features.parquet", index=False)
            configs[name] = {"site-name": name, "table": str(work / "features.parquet"), "workdir": str(work / "w")}
            key, pub = make_node_keys(work / "key")
            reg = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(pub), "fedrad", "--name", name],
                                 capture_output=True, text=True, env=flower_env(tmp_path / "cli"), timeout=120)
            assert reg.returncode == 0, reg.stdout + reg.stderr
            nodes.append(start_supernode(work / "node", name, f"127.0.0.1:{port}", free_port(), configs[name],
                                         root_certificates=certs["ca_cert"], auth_key=key))
        approve_plan_file_at_sites(tmp_path / "plan.json", list(configs.values()))
        out = tmp_path / "results"
        run_id = flwr_run(write_app(tmp_path / "app"), tmp_path / "cli", "fedrad",
                          {"plan": str(tmp_path / "plan.json"), "out-dir": str(out), "expected-sites": 2,
                           "round-timeout": 120.0}, ticket_home=tmp_path / "link")
        try:
            status = wait_for_run(tmp_path / "cli", "fedrad", run_id, timeout=300, poll=2.0,
                                  done_file=out / "results.json")
        except RuntimeFailure:
            raise AssertionError("\n".join(p.tail(30) for p in nodes + [link]))
        assert status["status"] == "finished:completed"
        assert json.loads((out / "results.json").read_text())["round_trips"] == 2
    finally:
        for proc in nodes + [link]:
            proc.stop()
    pooled = ComBat(covariates=["age", "sex"], categorical=["sex"]).fit_transform(
        df[feats], df["site"], df[["age", "sex"]])
    pooled = pd.DataFrame(np.asarray(pooled), columns=feats, index=df.index)
    for name, proc in zip(configs, nodes):
        got = pd.read_parquet(tmp_path / name / "w" / "harmonized" / "harmonized.parquet")
        np.testing.assert_allclose(got[feats].to_numpy(), pooled.loc[df.site == name].to_numpy(), rtol=1e-9)
        log = proc.log.read_text()
        assert "fast site runtime: on" in log and log.count("runs as pre-forked pid") == 2, log[-2000:]
        assert "no doorbell" not in log and "running stock Flower" not in log
