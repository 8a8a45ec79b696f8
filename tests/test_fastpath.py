"""fedrad's fast site runtime (fedrad.client.fastpath) without a deployment: the version guard, the SuperNode
clock, and the zygote's launcher protocol (exit status and stdio relayed, malformed requests refused, exit with
its SuperNode). tests/test_deployment.py runs a whole study on it against the stock runtime."""
from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
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
    real.now += 1.0
    clock.sleep(0.5)                    # a ClientApp running for a second: polled every 0.1 s
    real.now += 60
    clock.sleep(0.5)                    # a long extraction: at most every REPLY_POLL_MAX s
    real.now += fastpath.ACTIVE_SECONDS + 1
    clock.sleep(3)                      # idle for a while: Flower's own 3 s
    clock.touch()
    clock.sleep(3)
    clock.sleep(0.5)
    assert slept == [fastpath.ACTIVE_POLL, fastpath.REPLY_POLL, 1.25, 0.1, fastpath.REPLY_POLL_MAX, 3,
                     fastpath.ACTIVE_POLL, fastpath.REPLY_POLL]
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


def test_the_superexec_shim_runs_flowers_superexec_forked_from_the_zygote(zygote, tmp_path):
    """The SuperNode's ``flower-superexec`` (the shim) asks the zygote, which has Flower's SuperExec imported, to
    fork it: the same argument errors as Flower's own entry point, the zygote's log names the fork, and a request
    for any other entry is refused."""
    path, proc = zygote
    shim = [sys.executable, "-c", "import sys; from fedrad.client.fastpath import superexec_shim; "
                                  "sys.exit(superexec_shim(sys.argv[1:]))", "--no-such-flag"]
    env = {**os.environ, fastpath.SOCKET_ENV: path, fastpath.DOORBELL_ENV: str(tmp_path / "bell.sock")}
    forked = subprocess.run(shim, capture_output=True, text=True, timeout=120, env=env)
    direct = subprocess.run(shim, capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in env.items() if k != fastpath.SOCKET_ENV})
    assert forked.returncode == direct.returncode == 2
    assert "flower-superexec: error:" in forked.stderr
    assert forked.stderr.splitlines()[-1] == direct.stderr.splitlines()[-1]
    # the entry is checked: a request for something else is closed without a fork
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    body = json.dumps({"argv": [], "env": {}, "cwd": "/", "entry": "shell"}).encode()
    socket.send_fds(s, [struct.pack("!i", len(body)) + body], [0, 1, 2])
    s.settimeout(20)
    assert s.recv(4) == b""
    s.close()
    proc.terminate()
    log = proc.communicate(timeout=20)[1]
    assert "SuperExec (shim pid" in log and "forked from the zygote" in log and "malformed request" in log


def test_only_a_loopback_deployments_shared_zygote_forks_a_serverapp(zygote, tmp_path):
    """A site's zygote refuses to fork a ServerApp (or a SuperNode); the shared zygote of a loopback deployment
    (``--loopback``, one operator runs the coordinator and every site) forks Flower's ``flwr-serverapp`` for the
    SuperLink's shim, with the same argument errors as Flower's own entry point and a notice in its log."""
    site_path, site_proc = zygote
    shim = [sys.executable, "-c", "import sys; from fedrad.client.fastpath import serverapp_shim; "
                                  "sys.exit(serverapp_shim(sys.argv[1:]))", "--no-such-flag"]
    direct = subprocess.run(shim, capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != fastpath.SOCKET_ENV})
    assert direct.returncode == 2 and "flwr-serverapp: error:" in direct.stderr
    assert "ServerApp starts as a fresh process" in direct.stderr
    # a site's zygote closes a request for a ServerApp or a SuperNode without forking (the shim would then run it
    # in-process: ask directly)
    for entry in ("serverapp", "supernode"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(site_path)
        body = json.dumps({"argv": ["--help"], "env": {}, "cwd": "/", "entry": entry}).encode()
        socket.send_fds(s, [struct.pack("!i", len(body)) + body], [0, 1, 2])
        s.settimeout(20)
        assert s.recv(4) == b"", entry
        s.close()

    directory = tempfile.mkdtemp(prefix="fedrad-test-zyg-")
    path = os.path.join(directory, "zygote.sock")
    proc = subprocess.Popen([sys.executable, "-m", "fedrad.client.fastpath", "zygote", path, str(os.getpid()),
                             "--loopback"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not os.path.exists(path):
            assert proc.poll() is None and time.monotonic() < deadline, "loopback zygote did not start"
            time.sleep(0.05)
        forked = subprocess.run(shim, capture_output=True, text=True, timeout=120,
                                env={**os.environ, fastpath.SOCKET_ENV: path})
        assert forked.returncode == 2 and "flwr-serverapp: error:" in forked.stderr
        assert "fresh process" not in forked.stderr
        assert forked.stderr.splitlines()[-1] == direct.stderr.splitlines()[-1]
        assert _launch(path, "--help").returncode == 0  # and ClientApps, as a site's zygote does
    finally:
        proc.terminate()
        log = proc.communicate(timeout=20)[1]
    assert "ServerApp (launcher pid" in log and "runs as pre-forked pid" in log
    assert not os.path.exists(directory)


def test_a_forked_process_ends_with_its_zygote_however_the_zygote_ends(zygote):
    """A loopback deployment's SuperNodes and ServerApp are children of its zygote: a zygote killed outright (a
    SIGKILL, the OOM killer) must not leave them running orphaned. Here a SuperExec that keeps retrying an
    unreachable runtime address stands in for them."""
    path, proc = zygote
    shim = subprocess.Popen([sys.executable, "-c", "import sys; from fedrad.client.fastpath import superexec_shim; "
                             "sys.exit(superexec_shim(sys.argv[1:]))", "--insecure", "--runtime-api-address",
                             "127.0.0.1:1"], env={**os.environ, fastpath.SOCKET_ENV: path},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        children = []
        deadline = time.monotonic() + 60
        while not children:  # the zygote's only child: the forked SuperExec
            assert time.monotonic() < deadline and shim.poll() is None, "no SuperExec was forked"
            children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
            time.sleep(0.1)
        child = children[0]
        time.sleep(1.0)
        assert Path(f"/proc/{child}").exists()  # still retrying: a long-lived process
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 20
        while Path(f"/proc/{child}").exists() and "zombie" not in Path(f"/proc/{child}/status").read_text():
            assert time.monotonic() < deadline, "the forked SuperExec outlived its zygote"
            time.sleep(0.1)
        assert shim.wait(20) != 0  # its launcher reports the loss
    finally:
        shim.kill()
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def test_a_supernode_shares_a_zygote_only_with_a_loopback_superlink():
    assert fastpath._loopback_superlink(["--insecure", "--superlink", "127.0.0.1:9092", "--port", "9"])
    assert fastpath._loopback_superlink(["--superlink=localhost:9092"])
    assert fastpath._loopback_superlink(["--superlink", "[::1]:9092"])
    assert not fastpath._loopback_superlink(["--superlink", "10.0.0.5:9092"])
    assert not fastpath._loopback_superlink(["--superlink", "coordinator.example.org:9092"])
    assert not fastpath._loopback_superlink(["--port", "9"])


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


def test_a_launcher_waits_for_a_zygote_that_is_still_importing(tmp_path):
    """A message that arrives while the zygote imports waits for it (no second full import in a fresh process);
    a zygote that is gone is not waited for."""
    directory = tempfile.mkdtemp(prefix="fedrad-test-zyg-")
    path = os.path.join(directory, "clientapp.sock")
    code = "import sys; from fedrad.client.fastpath import run_via_zygote; sys.exit(run_via_zygote(sys.argv[1:]))"
    # the launcher starts first, knowing only the zygote's pid; the zygote binds its socket after its imports
    zygote = subprocess.Popen([sys.executable, "-c", f"""
import os, sys, time
time.sleep(1.5)  # a slow import
from fedrad.client.fastpath import zygote_main
sys.exit(zygote_main({path!r}, {os.getpid()}))
"""], stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        launched = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True,
                                  timeout=120, env={**os.environ, fastpath.SOCKET_ENV: path,
                                                    fastpath.PID_ENV: str(zygote.pid)})
        assert launched.returncode == 0 and time.monotonic() - t0 >= 1.0, launched.stderr
        assert "usage: flwr-clientapp" in launched.stdout  # run by a forked child of the zygote
    finally:
        zygote.terminate()
        zygote.wait(10)
    assert "runs as pre-forked pid" in zygote.stderr.read()
    # the same launcher with the zygote gone: it returns at once (the caller then runs in-process)
    t0 = time.monotonic()
    gone = subprocess.run([sys.executable, "-c", "import sys; from fedrad.client.fastpath import run_via_zygote; "
                           "print(run_via_zygote(['--help']))"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, fastpath.SOCKET_ENV: path, fastpath.PID_ENV: str(zygote.pid)})
    assert gone.stdout.strip() == "None" and time.monotonic() - t0 < 5


#: the launcher's former fixed wait for a zygote that was still importing
OLD_ZYGOTE_WAIT = 20.0


@pytest.mark.slow  # its zygote imports for longer than the old 20 s bound on purpose
def test_a_launcher_waits_for_a_zygote_importing_longer_than_any_fixed_bound(tmp_path):
    """A zygote whose imports take longer than the launcher's former 20 s (a loaded machine) still serves the
    launcher that arrived first: the wait lasts as long as the zygote lives and is starting."""
    directory = tempfile.mkdtemp(prefix="fedrad-test-zyg-")
    path = os.path.join(directory, "clientapp.sock")
    code = ("import sys; from fedrad.client.fastpath import run_via_zygote; code = run_via_zygote(sys.argv[1:]); "
            "print('launcher got', code); sys.exit(0 if code is None else code)")
    zygote = subprocess.Popen([sys.executable, "-c", f"""
import os, sys, time
time.sleep({OLD_ZYGOTE_WAIT + 2})  # imports slowed past the old bound
from fedrad.client.fastpath import zygote_main
sys.exit(zygote_main({path!r}, {os.getpid()}))
"""], stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        launched = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True,
                                  timeout=55, env={**os.environ, fastpath.SOCKET_ENV: path,
                                                   fastpath.PID_ENV: str(zygote.pid)})
        waited = time.monotonic() - t0
        assert "usage: flwr-clientapp" in launched.stdout, launched.stdout + launched.stderr
        assert launched.returncode == 0 and "launcher got 0" in launched.stdout and waited > OLD_ZYGOTE_WAIT
    finally:
        zygote.terminate()
        zygote.wait(10)
    assert "runs as pre-forked pid" in zygote.stderr.read()


def test_a_launcher_stops_waiting_for_a_zygote_that_makes_no_progress(monkeypatch):
    """A zygote that is alive but uses no CPU while it does not listen (stuck) is not waited for forever."""
    monkeypatch.setattr(fastpath, "ZYGOTE_STALL_SECONDS", 1.0)
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.5)
        monkeypatch.setenv(fastpath.SOCKET_ENV, os.path.join(tempfile.mkdtemp(prefix="fedrad-test-zyg-"), "z.sock"))
        monkeypatch.setenv(fastpath.PID_ENV, str(stuck.pid))
        t0 = time.monotonic()
        assert fastpath.run_via_zygote(["--help"]) is None
        assert 1.0 <= time.monotonic() - t0 < 10
    finally:
        stuck.kill()
        stuck.wait(10)


def test_superexec_clock_wakes_on_the_doorbell_and_polls_again_after_a_launch(tmp_path, monkeypatch):
    import flwr.supercore.superexec.run_superexec as rse

    directory = tempfile.mkdtemp(prefix="fedrad-test-bell-")
    bell_path = os.path.join(directory, "doorbell.sock")
    monkeypatch.setattr(rse, "time", rse.time)  # restored after the test
    handled = []
    monkeypatch.setattr(rse, "_handle_launch_result", lambda result, task: handled.append(task))
    clock = fastpath.patch_superexec(bell_path)
    try:
        assert rse.time is clock and oct(os.stat(bell_path).st_mode & 0o777) == "0o600"
        t0 = time.monotonic()
        clock.sleep(0.3)                          # nobody rings: the whole poll interval
        assert 0.25 <= time.monotonic() - t0 < 2
        monkeypatch.setenv(fastpath.DOORBELL_ENV, bell_path)
        threading.Timer(0.2, fastpath.ring_doorbell).start()
        t0 = time.monotonic()
        clock.sleep(10)                           # the SuperNode stored a message: awake at once
        assert time.monotonic() - t0 < 3
        fastpath.ring_doorbell()
        fastpath.ring_doorbell()
        clock.sleep(10)                           # two rings, one wake-up; both drained
        t0 = time.monotonic()
        clock.sleep(0.3)
        assert time.monotonic() - t0 >= 0.25
        rse._handle_launch_result("result", "task")  # Flower's loop after launching a ClientApp
        assert handled == ["task"] and clock.launched is True
        t0 = time.monotonic()
        clock.sleep(10)                           # right after a launch: poll again at once
        assert time.monotonic() - t0 < 0.1 and clock.launched is False
        assert clock.monotonic() <= time.monotonic()  # everything else is the real module
    finally:
        clock._bell.close()
        shutil.rmtree(directory, ignore_errors=True)
    monkeypatch.setenv(fastpath.DOORBELL_ENV, str(tmp_path / "nobody.sock"))
    fastpath.ring_doorbell()                      # nobody listening: silently nothing (the poll finds the task)


def test_folders_of_killed_supernodes_are_swept_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "fedrad.client.fastpath",
                             "supernode"])  # a command line like a running fast SuperNode's
    deadline = time.monotonic() + 30
    while not fastpath._is_fast_supernode(live.pid):  # Popen can return before the child's exec shows in /proc
        assert live.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    try:
        folders = {}
        for name, owner in (("killed", dead.pid), ("running", live.pid), ("creating", None)):
            folder = tmp_path / f"{fastpath.DIR_PREFIX}{name}"
            (folder / "bin").mkdir(parents=True)
            (folder / "doorbell.sock").write_text("")
            if owner is not None:
                (folder / fastpath.OWNER_FILE).write_text(str(owner))
            folders[name] = folder
        other = tmp_path / "something-else"
        other.mkdir()
        (other / fastpath.OWNER_FILE).write_text(str(dead.pid))
        assert fastpath.sweep_stale_directories(str(tmp_path)) == 1
        assert not folders["killed"].exists()
        assert folders["running"].exists() and folders["creating"].exists() and other.exists()
    finally:
        live.kill()
        live.wait()
