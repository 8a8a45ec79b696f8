"""``fedrad site join`` as a hospital runs it, on real processes: its SuperNode ends with it however it ends
(kill -9 included) and the SuperLink no longer lists the site; a taken local port is named before anything
starts (or, with no --port, a free one is used and named); a SuperNode that exits early is reported with the
line of its log that says why; ``connected to ... (node id N)`` once the SuperLink registered the site."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from fedrad.server.runtime import (BIN, flower_env, free_port, start_superlink, wait_for_port,
                                   write_cli_connection)
from tests.test_harmonize_flower import _table


def _join(root, name, superlink, *extra):
    """Start ``fedrad site join`` (its output in ``root/join-NAME.log``); returns the process and that log."""
    table = root / f"{name}.parquet"
    _table(seed=3).to_parquet(table, index=False)
    log = root / f"join-{name}.log"
    cmd = [str(BIN / "fedrad"), "site", "join", "--superlink", superlink, "--name", name, "--table", str(table),
           "--workdir", str(root / "sites" / name), *extra]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    return proc, log


def _wait_for(log, pattern, proc, timeout=90.0):
    """The first match of ``pattern`` in the join's output (fails if the join exits or time runs out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text(errors="replace"))
        if m:
            return m
        assert proc.poll() is None, f"site join exited with {proc.returncode}:\n{log.read_text()}"
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} within {timeout:.0f} s:\n{log.read_text()}")


def _session(sid):
    """Live (non-zombie) pids of session ``sid``: a SuperNode started by site join leads its own session, and its
    SuperExec, zygote and ClientApps are in it."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            pids.append(int(entry))
    return pids


def _session_ends(sid, timeout=15.0):
    """Whether every process of session ``sid`` is gone within ``timeout`` s (Flower's SuperExec notices that its
    SuperNode is gone within ~5 s)."""
    deadline = time.monotonic() + timeout
    while _session(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not _session(sid)


def _kill_session(sid):
    """Kill what a failed test left of the session ``sid`` (the SuperNode's own)."""
    if sid and _session(sid):
        try:
            os.killpg(sid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _nodes(cli):
    ls = subprocess.run([str(BIN / "flwr"), "supernode", "ls", "fedrad", "--format", "json"], capture_output=True,
                        text=True, env=flower_env(cli), timeout=120)
    return json.loads(ls.stdout[ls.stdout.find("{"):])["nodes"]


def _online(cli):
    return [n for n in _nodes(cli) if n.get("status") == "online"]


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


# slow: up to 60 s each waiting for the SuperLink to drop the killed node (tests/test_fastpath.py checks that a
# forked process dies with its zygote in the default suite)
@pytest.mark.slow
@pytest.mark.parametrize("stock", [False, True], ids=["fast", "stock"])
def test_kill_9_of_site_join_stops_its_supernode(tmp_path, stock):
    port = free_port()
    address = f"127.0.0.1:{port}"
    link = start_superlink(tmp_path / "link", port=port)
    join = supernode = None
    try:
        wait_for_port("127.0.0.1", port, link, 60)
        write_cli_connection(tmp_path / "cli", "fedrad", address)
        join, log = _join(tmp_path, "site1", address, "--port", str(free_port()), "--insecure",
                          *(["--stock"] if stock else []))
        node = int(_wait_for(log, rf"connected to {re.escape(address)} as site1 \(node id (\d+)\)", join).group(1))
        supernode = int(_wait_for(log, r"SuperNode pid (\d+)", join).group(1))
        assert [n["node-id"] for n in _online(tmp_path / "cli")] == [str(node)]
        family = _session(supernode)
        assert supernode in family and len(family) >= 2, family  # the SuperNode and at least its SuperExec
        os.kill(join.pid, signal.SIGKILL)
        join.wait(10)
        assert _session_ends(supernode), f"left running after kill -9 of site join: {_session(supernode)}"
        # the SuperNode unregisters on its SIGTERM; when the signal lands inside a pull its goodbye can be lost,
        # and the SuperLink then drops the dead node after its missed heartbeats (at most 60 s)
        deadline = time.monotonic() + 80
        while _online(tmp_path / "cli") and time.monotonic() < deadline:
            time.sleep(2)
        assert _online(tmp_path / "cli") == [], "the SuperLink still lists the site as online"
    finally:
        if join is not None:
            _stop(join)
        _kill_session(supernode)
        link.stop()


def _held_port(port=0):
    """A listening socket on 127.0.0.1:``port`` (0: any free port), or None when ``port`` is already taken."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    s.listen(1)
    return s


def test_site_join_names_a_taken_port_uses_a_free_one_and_says_why_its_supernode_exited(tmp_path):
    from fedrad.client.keys import make_node_keys
    from fedrad.server.certs import make_certificates

    certs = make_certificates(tmp_path / "certs")
    good_key, good_pub = make_node_keys(tmp_path / "good")
    bad_key, _ = make_node_keys(tmp_path / "bad")
    port = free_port()
    address = f"127.0.0.1:{port}"
    tls = {"ca": certs["ca_cert"], "cert": certs["server_cert"], "key": certs["server_key"]}
    link = start_superlink(tmp_path / "link", port=port, database=tmp_path / "state.db", tls=tls, node_auth=True)
    held = [_held_port()]
    join = supernode = None
    tls_args = ["--root-certificates", str(certs["ca_cert"])]
    try:
        wait_for_port("127.0.0.1", port, link, 60)
        write_cli_connection(tmp_path / "cli", "fedrad", address, certs["ca_cert"])
        reg = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(good_pub), "fedrad", "--name", "site1"],
                             capture_output=True, text=True, env=flower_env(tmp_path / "cli"), timeout=120)
        assert reg.returncode == 0, reg.stdout + reg.stderr

        # a --port another process holds: one line naming it and the fix, before any SuperNode starts
        taken = held[0].getsockname()[1]
        proc, log = _join(tmp_path, "site2", address, "--port", str(taken), *tls_args, "--auth-key", str(good_key))
        assert proc.wait(60) == 1
        out = log.read_text()
        assert out.strip().splitlines()[-1] == (f"fedrad: error: port {taken} is in use (another site on this "
                                                "host?); pass another --port N, or leave --port out to use a free one")
        assert "SuperNode pid" not in out and not (tmp_path / "sites" / "site2" / "flower").exists()

        # a SuperNode that exits early (its key is not registered): the reason from its log, in one line
        proc, log = _join(tmp_path, "intruder", address, "--port", str(free_port()), *tls_args,
                          "--auth-key", str(bad_key))
        assert proc.wait(120) not in (0, None)
        last = log.read_text().strip().splitlines()[-1]
        assert last.startswith("fedrad: error: site intruder: the SuperNode exited with code "), last
        assert "Failed to activate SuperNode" in last and "supernode.log" in last, last

        # no --port while the default 9094 is taken (held here, or by someone else): a free port, named
        held.append(_held_port(9094))
        join, log = _join(tmp_path, "site1", address, *tls_args, "--auth-key", str(good_key))
        chosen = int(_wait_for(log, r"port 9094 is in use \(another site on this host\?\); the SuperNode's local "
                                    r"runtime API uses free port (\d+)", join).group(1))
        node = int(_wait_for(log, rf"connected to {re.escape(address)} as site1 \(node id (\d+)\)", join).group(1))
        supernode = int(_wait_for(log, r"SuperNode pid (\d+)", join).group(1))
        assert chosen != 9094 and f"(local port {chosen})" in log.read_text()
        with open(f"/proc/{supernode}/cmdline", "rb") as f:
            assert f"\0--port\0{chosen}\0".encode() in f.read()
        assert [n["node-id"] for n in _online(tmp_path / "cli")] == [str(node)]
        join.send_signal(signal.SIGTERM)
        assert join.wait(30) == 0
        assert log.read_text().strip().splitlines()[-1] == "site site1: SuperNode stopped"
        assert _session_ends(supernode), _session(supernode)
    finally:
        if join is not None:
            _stop(join)
        _kill_session(supernode)
        for s in held:
            if s is not None:
                s.close()
        link.stop()
