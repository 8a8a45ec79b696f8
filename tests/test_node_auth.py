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
