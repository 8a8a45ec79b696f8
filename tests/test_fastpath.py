"""fedrad's fast site runtime (fedrad.client.fastpath) without a deployment: the version guard, the SuperNode
clock, and the zygote's launcher protocol (exit status and stdio relayed, malformed requests refused, exit with
its SuperNode). tests/test_deployment.py runs a whole study on it against the stock runtime."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedrad.client import fastpath


def test_version_guard_accepts_exactly_the_flower_it_was_written_for(monkeypatch):
    assert fastpath.unsupported() is None  # this venv pins flwr 1.42.0
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.42.1")
    assert fastpath.unsupported() == "written for Flower 1.42.0, found 1.42.1"


def test_node_clock_shortens_only_the_idle_pull_and_the_reply_wait():
    slept = []

    class Real:
        now = 100.0

        def monotonic(self):
            return self.now

        def sleep(self, s):
            slept.append(s)

    real = Real()
    clock = fastpath._NodeClock(real)
    clock.sleep(3)                      # just after start / a message: fast poll
    clock.sleep(0.5)                    # waiting for the ClientApp's reply
    clock.sleep(1.25)                   # anything else: unchanged
    real.now += fastpath.ACTIVE_SECONDS + 1
    clock.sleep(3)                      # idle for a while: Flower's own 3 s
    clock.touch()
    clock.sleep(3)
    assert slept == [fastpath.ACTIVE_POLL, fastpath.REPLY_POLL, 1.25, 3, fastpath.ACTIVE_POLL]
    assert clock.monotonic() == real.now  # everything else is the real module


@pytest.fixture
def zygote():
    """A zygote serving a short socket path, parented by this test process."""
    directory = tempfile.mkdtemp(prefix="fedrad-test-zyg-")
    path = os.path.join(directory, "clientapp.sock")
    proc = subprocess.Popen([sys.executable, "-m", "fedrad.client.fastpath", "zygote", path, str(os.getpid())],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        assert proc.poll() is None and time.monotonic() < deadline, "zygote did not start"
        time.sleep(0.05)
    yield path, proc
    proc.terminate()
    proc.wait(10)
    assert not os.path.exists(directory)  # SIGTERM (a SuperNode's stop) cleans up too


def _launch(path: str, *argv: str) -> subprocess.CompletedProcess:
    """The pinned launcher's code path, in a fresh process with the zygote's socket in its environment."""
    code = "import sys; from fedrad.client.fastpath import run_via_zygote; sys.exit(run_via_zygote(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, fastpath.SOCKET_ENV: path})


def test_zygote_child_runs_the_pinned_entry_with_the_launchers_stdio_and_exit_status(zygote):
    path, proc = zygote
    # what the in-process launcher does with the same argv (Flower's argument parser refuses it)
    direct = subprocess.run([sys.executable, "-c", "import sys; from fedrad.client.app_trust import clientapp_main;"
                             " sys.exit(clientapp_main(sys.argv[1:]))", "--no-such-flag"],
                            capture_output=True, text=True, timeout=120)
    forked = _launch(path, "--no-such-flag")
    assert direct.returncode == 2 and forked.returncode == 2
    assert "flwr-clientapp: error:" in forked.stderr and forked.stderr == direct.stderr  # the child's own stderr
    assert proc.poll() is None  # the zygote serves the next one
    assert _launch(path, "--help").returncode == 0


def test_zygote_refuses_malformed_requests_and_keeps_serving(zygote):
    path, proc = zygote
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(b"\x00\x00\x00\x05hello")  # no file descriptors, not JSON
    s.settimeout(20)
    assert s.recv(4) == b""  # closed without forking
    s.close()
    assert _launch(path, "--help").returncode == 0 and proc.poll() is None


def test_without_a_zygote_the_launcher_runs_in_process(tmp_path, monkeypatch):
    monkeypatch.delenv(fastpath.SOCKET_ENV, raising=False)
    assert fastpath.run_via_zygote(["--help"]) is None  # no socket configured: the caller runs clientapp_main
    monkeypatch.setenv(fastpath.SOCKET_ENV, str(tmp_path / "none.sock"))
    assert fastpath.run_via_zygote(["--help"]) is None  # configured but nobody listens: the same


def test_zygote_exits_with_its_supernode(tmp_path):
    directory = tempfile.mkdtemp(prefix="fedrad-test-zyg-")
    path = os.path.join(directory, "clientapp.sock")
    parent = subprocess.Popen([sys.executable, "-c", f"""
import subprocess, sys, time
z = subprocess.Popen([sys.executable, "-m", "fedrad.client.fastpath", "zygote", {path!r}, str(__import__('os').getpid())])
print(z.pid, flush=True)
time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    zpid = int(parent.stdout.readline())
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    parent.kill()
    parent.wait(10)
    deadline = time.monotonic() + 20
    while Path(f"/proc/{zpid}").exists() and Path(f"/proc/{zpid}/status").read_text().find("zombie") < 0:
        assert time.monotonic() < deadline, "zygote outlived its SuperNode"
        time.sleep(0.1)
    assert not os.path.exists(path) and not os.path.exists(directory)  # cleaned up
