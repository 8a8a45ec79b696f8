"""Flower's deployment runtime as real processes: SuperLink, SuperNodes, ``flwr run``, run status.

fedrad does not implement a server or an RPC layer: the coordinator runs ``flower-superlink``, each site runs
``flower-supernode`` with its ``--node-config`` (TOML values: strings quoted), and a study is submitted with
``flwr run`` as a thin Flower app whose components are the installed ``fedrad`` modules
(``fedrad.server.server_app:app``, ``fedrad.client.client_app:app``). Notes that shaped this module
(../shared/FLOWER.md, FLOWER-LATENCY.md):

* Flower spawns ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by name: the venv's ``bin``
  must be first on ``PATH`` of every process started here.
* ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1`` on SuperNodes (stock latency recipe; 0.01 starves 2 cores), 0.2 on
  the SuperLink (how soon a submitted run's ServerApp starts).
* ``flwr run --stream`` exits 0 even when the run fails: :func:`wait_for_run` polls ``flwr ls``.
* Results are written by the ServerApp itself (no ``flwr pull`` in open-source Flower).
* A SuperNode stopped with SIGTERM unregisters at once. A crashed one (SIGKILL, host down) is noticed by its
  missing heartbeats: Flower 1.42 SuperNodes send one every 17.5-22.5 s (hard-coded 30 s interval) and the
  SuperLink marks a node offline 2 x 30 s after its last one, so within 37.5-60 s of the crash every message
  still waiting for that node gets a NODE_UNAVAILABLE error reply (code 5), which ``Federation.ask`` reports as
  that site's failure. A round timeout above 60 s therefore never fires first for a crashed site.
* App pinning (:mod:`fedrad.client.app_trust`, on by default in :func:`start_supernode`): a SuperNode started
  here runs only this module's thin app; any other FAB submitted to the SuperLink is refused before it is unpacked.
* With ``--database FILE`` the SuperLink keeps runs and registered nodes across its own restarts; SuperNodes keep
  retrying and come back online without a restart of their own.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import fedrad

BIN = Path(sys.executable).parent
#: the Flower app's components: installed fedrad modules (the FAB carries only its pyproject.toml)
APP_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedrad-study"
version = "{version}"
description = "fedrad study app: components live in the installed fedrad package"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedrad"

[tool.flwr.app.components]
serverapp = "fedrad.server.server_app:app"
clientapp = "fedrad.client.client_app:app"

[tool.flwr.app.config]
sim-root = ""
expected-sites = 1
connect-timeout = 120.0
round-timeout = 600.0
poll-interval = 0.05
max-concurrent-sites = 0
"""


class RuntimeFailure(RuntimeError):
    """A Flower process or run failed; the message says which and where its log is."""


class RunTimeout(RuntimeFailure):
    """A run did not finish within the time it was given (it may still be running on the SuperLink)."""


def toml_value(value) -> str:
    """A Python value as a TOML literal (``--node-config`` and ``--run-config`` values are TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def toml_pairs(config: dict) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in config.items())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``host:port`` cannot be bound (a listening socket holds it), as the SuperNode's local runtime API
    (uvicorn, SO_REUSEADDR) would bind it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LEVEL = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s*")
#: log lines that say nothing about why a process ended (uvicorn's shutdown, tracebacks' frames, help links)
_NOISE = re.compile(r"^(Waiting for application (startup|shutdown)|Application (startup|shutdown) complete|"
                    r"FastAPI lifespan|Finished server process|Started server process|Shutting down|"
                    r"For more information, visit|Traceback \(most recent call last\))")


def _log_lines(text: str) -> list[tuple[str, str]]:
    """(level, message) of each non-blank line of a Flower log (colour codes removed; "" for a continuation)."""
    lines = []
    for raw in text.splitlines():
        line = _ANSI.sub("", raw).rstrip()
        if not line.strip():
            continue
        m = _LEVEL.match(line)
        lines.append((m.group(1), line[m.end():].strip()) if m else ("", line))
    return lines


def supernode_node_id(text: str) -> int | None:
    """The node id a SuperNode logged once the SuperLink registered it (``SuperNode ID: N``), or None."""
    m = re.search(r"SuperNode ID: (\d+)", _ANSI.sub("", text))
    return int(m.group(1)) if m else None


def exit_reason(text: str) -> str:
    """The line of a Flower process's log that says why it ended: its last error (with the message that follows
    Flower's ``Exit Code: N``), else its last line that is not shutdown noise or a traceback frame."""
    lines = _log_lines(text)
    for i in range(len(lines) - 1, -1, -1):
        level, message = lines[i]
        if level not in ("ERROR", "CRITICAL") or not message:
            continue
        code = re.fullmatch(r"Exit Code: (\d+)", message)
        if code:  # flwr_exit: the message, then a short help, each on lines of their own
            rest = []
            for lv, m in lines[i + 1:i + 4]:
                if lv or _NOISE.match(m):
                    break
                rest.append(m.strip())
            message = f"Flower exit code {code.group(1)}" + (f": {' '.join(rest)}" if rest else "")
        return message
    for level, message in reversed(lines):
        if message and not _NOISE.match(message) and not _frame(message):
            return message.strip()
    return ""


def _frame(line: str) -> bool:
    """A traceback's frame or source excerpt (indented, or only carets) rather than a message."""
    return line.startswith((" ", "\t")) or set(line.strip()) <= set("^~ ")


def flower_env(home: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(home)
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env.update(extra)
    return env


#: the FAB id (``publisher/name``) of :data:`APP_PYPROJECT`: the only app a fedrad SuperNode runs
APP_ID = "fedrad/fedrad-study"
APP_COMPONENTS = {"serverapp": "fedrad.server.server_app:app", "clientapp": "fedrad.client.client_app:app"}


def app_version() -> str:
    return fedrad.__version__.split("+")[0]


def app_pyproject() -> str:
    """The thin app's pyproject.toml for the installed fedrad version (sites pin exactly this app)."""
    return APP_PYPROJECT.format(version=app_version())


def write_app(directory: Path) -> Path:
    """The thin Flower app directory (only a pyproject.toml) that ``flwr run`` packages into a FAB."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(app_pyproject())
    return directory


def is_loopback_address(address: str) -> bool:
    """``HOST:PORT`` (or a bare host) names this machine: ``localhost``, 127.0.0.0/8 or ``::1``."""
    import ipaddress

    host = address.strip()
    if host.count(":") == 1 or (host.startswith("[") and "]:" in host):
        host = host.rsplit(":", 1)[0]
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path
    terminated: bool = False

    def alive(self) -> bool:
        return self.popen.poll() is None

    def terminate(self) -> None:
        """Send SIGTERM without waiting (:meth:`stop` then waits, without a second SIGTERM)."""
        if self.alive() and not self.terminated:
            self.popen.send_signal(signal.SIGTERM)
            self.terminated = True

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            self.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def kill(self) -> None:
        """SIGKILL the process and everything it started (its own session): a crash, nothing cleans up."""
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            raise RuntimeFailure(f"{self.name} (pid {self.popen.pid}) survived SIGKILL")

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


#: Linux prctl(2) option: the signal a process gets when the thread that started it ends
PR_SET_PDEATHSIG = 1


def die_with_this_process(sig: int = signal.SIGTERM):
    """A ``preexec_fn`` that makes the child get ``sig`` when this process ends, however it ends (SIGKILL and
    the OOM killer included): Linux's ``PR_SET_PDEATHSIG``, which survives the child's exec. A child whose
    parent ended between the fork and the prctl signals itself. None where prctl(2) does not exist (the child
    then outlives a killed parent). Call it in the thread that will start the child: the kernel ties the signal
    to that thread."""
    from fedrad.client.fastpath import _prctl

    prctl = _prctl()
    if prctl is None or not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


def _spawn(name: str, cmd: list[str], env: dict, log: Path, *, die_with_parent: bool = False) -> Process:
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # a log names plans, sites and paths: 0600
    os.fchmod(fd, 0o600)
    f = os.fdopen(fd, "ab")
    preexec = die_with_this_process() if die_with_parent else None
    popen = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                             preexec_fn=preexec)
    f.close()
    return Process(name, popen, log)


SUPERLINK_TASK_POLL = 0.2


def start_loopback_zygote(home: Path) -> tuple[Process, str]:
    """A loopback deployment's one zygote (:func:`fedrad.client.fastpath.zygote_main` with ``--loopback``): it
    imports Flower's runners, the scientific stack and fedrad once, and forks the SuperNodes, every site's
    SuperExec and ClientApps, and the SuperLink's SuperExec and ServerApp (each of them imported the same modules
    on its own before: ~3.5 s of CPU per site and ~3 s for the ServerApp, all at the start of a run). Returns
    the process and its socket path; the socket's folder is 0700 and the zygote serves only this user (peer uid
    checked) and exits with this process."""
    directory = tempfile.mkdtemp(prefix="fedrad-loopback-")  # short: a Unix socket path has ~100 bytes
    path = os.path.join(directory, "zygote.sock")
    cmd = [sys.executable, "-m", "fedrad.client.fastpath", "zygote", path, str(os.getpid()), "--loopback"]
    return _spawn("zygote", cmd, flower_env(home), home / "zygote.log"), path


def start_superlink(home: Path, host: str = "127.0.0.1", port: int = 9300, *, database: Path | None = None,
                    tls: dict | None = None, node_auth: bool = False, simulation: bool = False,
                    zygote: tuple[Process, str] | None = None, coordinator_home: Path | None = None,
                    fleet_address: str | None = None, superexec_secret: Path | None = None,
                    die_with_parent: bool = False) -> Process:
    """``flower-superlink`` on ``host:port`` (one HTTP port serves SuperNodes, ``flwr`` and the ServerApp);
    with ``simulation`` it runs Flower's simulation engine (Ray) instead of waiting for SuperNodes. ``zygote``
    (:func:`start_loopback_zygote`): its SuperExec and ServerApps are forked from that zygote.

    ``coordinator_home`` (default ``home``) is where the ServerApp finds its run tickets and signing key
    (:mod:`fedrad.server.tickets`). ``fleet_address``: the sites' address, serving the Fleet API only, while
    ``host:port`` serves every API (:mod:`fedrad.server.superlink`). ``superexec_secret``: process isolation, the
    SuperExec is started separately (:func:`start_superexec`) and must present this secret."""
    from fedrad.server.tickets import HOME_ENV

    cmd = [str(BIN / "flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if fleet_address is not None:
        cmd = [sys.executable, "-m", "fedrad.server.superlink", "--fleet-address", fleet_address, *cmd[1:]]
    if superexec_secret is not None:
        cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(superexec_secret)]
    if simulation:
        cmd += ["--simulation"]
    if database is not None:
        cmd += ["--database", str(database)]
    if tls:
        cmd += ["--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]),
                "--ssl-keyfile", str(tls["key"])]
        if node_auth:
            cmd += ["--enable-supernode-auth"]
    else:
        cmd += ["--insecure"]
    # the SuperLink's own SuperExec starts a submitted run's ServerApp: polled every 0.2 s, not Flower's 1 s
    env = flower_env(home, FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(SUPERLINK_TASK_POLL))
    env[HOME_ENV] = str(Path(coordinator_home or home).resolve())
    if zygote is not None:
        from fedrad.client import fastpath

        bindir = fastpath.install_shims(str(home / "fedrad-bin"), ("flower-superexec", "flwr-serverapp"))
        env.update({"PATH": bindir + os.pathsep + env["PATH"], fastpath.SOCKET_ENV: zygote[1],
                    fastpath.PID_ENV: str(zygote[0].popen.pid)})
    return _spawn("superlink", cmd, env, home / "superlink.log", die_with_parent=die_with_parent)


def start_superexec(home: Path, runtime_address: str, secret: Path, *, coordinator_home: Path,
                    root_certificates: Path | None = None, parent_pid: int | None = None,
                    die_with_parent: bool = False) -> Process:
    """The coordinator's own ``flower-superexec`` for a SuperLink in process isolation: it alone holds the
    SuperExec secret, so only it can claim a run's ServerApp; ServerApps it starts see ``coordinator_home``."""
    from fedrad.server.tickets import HOME_ENV

    # fedrad.server.superexec: Flower's SuperExec that also reaps its finished ServerApps (no <defunct> left)
    cmd = [sys.executable, "-m", "fedrad.server.superexec", "--runtime-api-address", runtime_address,
           "--superexec-auth-secret-file", str(secret)]
    cmd += ["--root-certificates", str(root_certificates)] if root_certificates else ["--insecure"]
    if parent_pid is not None:
        cmd += ["--parent-pid", str(parent_pid)]
    env = flower_env(home, FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(SUPERLINK_TASK_POLL))
    env[HOME_ENV] = str(Path(coordinator_home).resolve())
    return _spawn("superexec", cmd, env, home / "superexec.log", die_with_parent=die_with_parent)


def ensure_secret(path: Path) -> Path:
    """A 32-byte random secret in ``path`` (0600), created when absent (the SuperExec authentication secret)."""
    import secrets

    path = Path(path)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    return path


def start_supernode(home: Path, name: str, superlink: str, port: int, node_config: dict, *,
                    root_certificates: Path | None = None, auth_key: Path | None = None,
                    poll_interval: float = 0.1, pin_app: bool = True, fast: bool = True,
                    zygote: tuple[Process, str] | None = None, die_with_parent: bool = False) -> Process:
    """``flower-supernode`` for one site; ``node_config`` becomes its TOML ``--node-config``.

    ``pin_app`` (the default, always on for ``fedrad site join``): the SuperNode runs only fedrad's own thin app.
    Its ClientApp processes are started through :mod:`fedrad.client.app_trust`, which checks every run's FAB
    before Flower installs or imports anything from it and answers any other app with an error reply. Raises
    :class:`RuntimeFailure` when the pin cannot be enabled (a Flower version other than 1.42.x) unless the
    SuperLink is on loopback, where the node then starts unpinned with a warning in its log. ``pin_app=False``
    is refused off loopback.

    ``fast`` (the default): the SuperNode runs through :mod:`fedrad.client.fastpath` (short idle pull after a
    message, pre-forked ClientApps), which falls back to stock Flower with a notice in the log on any Flower
    but 1.42.0 or without the pin; ``fast=False`` starts Flower's own ``flower-supernode`` unchanged. ``zygote``
    (a loopback SuperLink only): the deployment's shared zygote instead of one of the node's own.

    ``die_with_parent`` (``fedrad site join``, which runs the node in the foreground): the SuperNode gets SIGTERM
    when this process ends, however it ends (:func:`die_with_this_process`), so it unregisters and stops its
    SuperExec and zygote instead of answering on, orphaned, after a ``kill -9`` of its command."""
    from fedrad.client import app_trust

    cmd = [str(BIN / "flower-supernode"), "--superlink", superlink, "--port", str(port),
           "--node-config", toml_pairs(node_config)]
    loopback = is_loopback_address(superlink)
    if not pin_app and not loopback:
        raise RuntimeFailure(f"site {name}: app pinning can only be turned off for a loopback SuperLink, "
                             f"not {superlink}")
    warning = None
    if pin_app and not app_trust.flower_supported():
        warning = (f"site {name}: app pinning needs Flower {app_trust.FLOWER_SERIES}.x, found Flower "
                   f"{app_trust.flower_version()}")
        if not loopback:
            raise RuntimeFailure(f"{warning}: refusing to join {superlink} (a SuperNode without the pin would "
                                 "install and run any app submitted to the SuperLink)")
        pin_app = False
    if root_certificates:
        cmd += ["--root-certificates", str(root_certificates)]
        if auth_key:
            cmd += ["--auth-supernode-private-key", str(auth_key)]
    else:
        cmd += ["--insecure"]
    env = flower_env(home, FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(poll_interval))
    if pin_app:
        try:
            env = app_trust.pinned_env(env, app_trust.install_launchers(home / "fedrad-bin"))
        except (OSError, app_trust.UntrustedApp) as exc:
            raise RuntimeFailure(f"site {name}: cannot enable app pinning: {exc}") from exc
    if fast and pin_app:
        cmd = [sys.executable, "-m", "fedrad.client.fastpath", "supernode", *cmd[1:]]
        if zygote is not None and loopback:
            from fedrad.client import fastpath

            env[fastpath.SHARED_ENV] = f"{zygote[1]}:{zygote[0].popen.pid}"
    log = home / "supernode.log"
    if warning:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"WARNING fedrad: {warning}; loopback SuperLink: starting WITHOUT app pinning\n")
    return _spawn(f"supernode {name}", cmd, env, log, die_with_parent=die_with_parent)


def wait_for_port(host: str, port: int, proc: Process, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeFailure(f"{proc.name} exited with code {proc.popen.returncode}; log {proc.log}:\n"
                                 f"{proc.tail()}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeFailure(f"{proc.name} did not listen on {host}:{port} within {timeout:.0f} s; log {proc.log}")


def write_cli_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None = None) -> None:
    """The ``flwr`` CLI's connection to the SuperLink (``$FLWR_HOME/config.toml``; Flower wants an absolute
    certificate path, so a relative one is resolved here)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    lines.append(f'root-certificates = "{Path(root_certificates).resolve()}"' if root_certificates
                 else "insecure = true")
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def flwr_run(app_dir: Path, flwr_home: Path, connection: str, run_config: dict,
             federation_config: dict | None = None, *, ticket_home: Path | None = None) -> int:
    """Submit a run; returns its run id (``federation_config``: e.g. ``{"num-supernodes": 50}`` in simulation).

    ``run_config`` may name ``plan`` and ``out-dir``: they are not sent to the SuperLink but written into the
    run's ticket in ``ticket_home`` (the coordinator home of the SuperLink, :mod:`fedrad.server.tickets`) once
    the run id is known; the ServerApp runs only runs with a ticket."""
    run_config = dict(run_config)
    plan, out_dir = run_config.pop("plan", None), run_config.pop("out-dir", None)
    if (plan is None) != (out_dir is None) or (plan is not None and ticket_home is None):
        raise ValueError("a run's plan and out-dir go together, into the ticket of a coordinator home")
    cmd = [str(BIN / "flwr"), "run", str(app_dir), connection, "--format", "json"]
    pending = None
    if plan is not None:
        from fedrad.server import tickets

        pending = tickets.announce(Path(ticket_home))
    try:
        return _submit(cmd, flwr_home, run_config, federation_config, plan, out_dir, ticket_home, pending)
    finally:
        if pending is not None:
            pending.unlink(missing_ok=True)


def _submit(cmd, flwr_home, run_config, federation_config, plan, out_dir, ticket_home, pending) -> int:
    if run_config:
        cmd += ["--run-config", toml_pairs(run_config)]
    if federation_config:
        cmd += ["--federation-config", toml_pairs(federation_config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=flower_env(flwr_home), timeout=300)
    try:
        out = json.loads(proc.stdout[proc.stdout.find("{"):])
    except ValueError:
        out = {}
    if proc.returncode != 0 or not out.get("success", True) or "run-id" not in out:
        raise RuntimeFailure(f"flwr run failed (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-1500:]}")
    run_id = int(out["run-id"])
    if plan is not None:
        from fedrad.server import tickets

        tickets.issue(Path(ticket_home), run_id, Path(plan), Path(out_dir), pending)
    return run_id


def _flwr_ls(flwr_home: Path, connection: str, *args: str, one: bool = False) -> list[dict]:
    """``flwr ls CONNECTION ARGS --format json`` as a list of runs (``one``: exactly the first is required)."""
    proc = subprocess.run([str(BIN / "flwr"), "ls", connection, *args, "--format", "json"], capture_output=True,
                          text=True, env=flower_env(flwr_home), timeout=120)
    try:
        runs = list(json.loads(proc.stdout[proc.stdout.find("{"):])["runs"])
        return [runs[0]] if one else runs
    except (ValueError, KeyError, IndexError):
        raise RuntimeFailure(f"flwr ls failed (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-800:]}")


def run_status(flwr_home: Path, connection: str, run_id: int) -> dict:
    return _flwr_ls(flwr_home, connection, "--run-id", str(run_id), one=True)[0]


def list_runs(flwr_home: Path, connection: str) -> list[dict]:
    """Every run the SuperLink knows (``flwr ls``): what survives a SuperLink restart with ``--database``."""
    return _flwr_ls(flwr_home, connection)


def stop_run(flwr_home: Path, connection: str, run_id: int, timeout: float = 60.0) -> str:
    """``flwr stop RUN``, then wait until the SuperLink records the run as finished (its ServerApp ends with
    it); returns the run's last status ("" when it could not be asked)."""
    subprocess.run([str(BIN / "flwr"), "stop", str(run_id), connection, "--format", "json"], capture_output=True,
                   text=True, env=flower_env(flwr_home), timeout=120)
    deadline, state = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        try:
            state = str(run_status(flwr_home, connection, run_id).get("status", ""))
        except RuntimeFailure:
            return ""
        if state.startswith("finished"):
            break
        time.sleep(1.0)
    return state


def list_nodes(flwr_home: Path, connection: str) -> list[dict]:
    """The SuperNodes the SuperLink knows (``flwr supernode ls --format json``): node id, status, times."""
    proc = subprocess.run([str(BIN / "flwr"), "supernode", "ls", connection, "--format", "json"],
                          capture_output=True, text=True, env=flower_env(flwr_home), timeout=120)
    try:
        doc = json.loads(proc.stdout[proc.stdout.find("{"):])
    except ValueError:
        doc = {}
    if not doc.get("success", False) or "nodes" not in doc:
        reason = doc.get("error-message") or (proc.stdout + proc.stderr).strip()[-500:]
        raise RuntimeFailure(f"flwr supernode ls failed (exit {proc.returncode}): {' '.join(str(reason).split())}")
    return list(doc["nodes"])


#: the coordinator home's record of the sites it registered: name -> node id (Flower's node list has ids only)
SITES_FILE = "sites.json"


def registered_sites(home: Path) -> dict[str, int]:
    try:
        return {str(k): int(v) for k, v in json.loads((Path(home) / SITES_FILE).read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def record_site(home: Path, name: str, node_id: int) -> None:
    """Remember that site ``name`` was registered as ``node_id`` (``fedrad coordinator register-site``)."""
    from fedrad.common.files import atomic_write_bytes

    sites = registered_sites(home)
    sites[name] = int(node_id)
    atomic_write_bytes(Path(home) / SITES_FILE, json.dumps(sites, indent=1, sort_keys=True).encode())


def run_log(flwr_home: Path, connection: str, run_id: int) -> str:
    proc = subprocess.run([str(BIN / "flwr"), "log", str(run_id), connection, "--show"], capture_output=True,
                          text=True, env=flower_env(flwr_home), timeout=120)
    return proc.stdout + proc.stderr


def wait_for_run(flwr_home: Path, connection: str, run_id: int, timeout: float, poll: float = 10.0,
                 on_poll=None, tick: float = 1.0, done_file: Path | None = None, finished: bool = True) -> dict:
    """Poll ``flwr ls`` (every ``poll`` s: each call is a Python process that costs ~1 s of CPU) until the run
    finishes; ``on_poll`` is called every ``tick`` s in between. Raises :class:`RuntimeFailure` unless the run
    completed.

    ``done_file`` is the file the ServerApp writes (atomically) as its last act: once it is (re)written the
    status is asked at once, and with ``finished=False`` the wait ends there (``{"status": "results-written"}``)
    without waiting for Flower to record the run as finished (~1-3 s more). A file already there when the wait
    starts counts only once it is replaced."""
    deadline = time.monotonic() + timeout

    def stamp():
        try:
            st = os.stat(done_file)
            return st.st_ino, st.st_mtime_ns
        except (OSError, TypeError):
            return None

    stale = stamp()  # a file left by an earlier run is not this run's results

    def done() -> bool:
        now = stamp()
        return now is not None and now != stale

    def pause(seconds: float) -> None:
        """Up to ``seconds``, calling ``on_poll`` every ``tick``; over as soon as the results file is written."""
        end, next_tick = time.monotonic() + seconds, time.monotonic() + tick
        while time.monotonic() < end and not done():
            time.sleep(0.05)
            if on_poll and time.monotonic() >= next_tick:
                on_poll(None)
                next_tick = time.monotonic() + tick

    if not finished and done_file is not None:
        # the first status question (a ~1 s CPU process, while the sites and the ServerApp start on the same
        # cores) waits one poll interval: it is only there to catch a run that failed
        pause(poll)
    while True:
        if not finished and done():
            if on_poll:
                on_poll(None)
            return {"run-id": run_id, "status": "results-written", "status-details": str(done_file)}
        next_poll = time.monotonic() + poll
        status = run_status(flwr_home, connection, run_id)
        state = str(status.get("status", ""))
        if on_poll:
            on_poll(status)
        if state.startswith("finished"):
            if state != "finished:completed":
                details = status.get("status-details") or ""
                raise RuntimeFailure(f"run {run_id} {state}: {details}\n{run_log(flwr_home, connection, run_id)[-3000:]}")
            return status
        if time.monotonic() > deadline:
            raise RunTimeout(f"run {run_id} still {state or 'pending'} after {timeout:.0f} s")
        if done():  # the run is finishing: ask again shortly
            time.sleep(0.2)
            continue
        pause(next_poll - time.monotonic())


class _FlowerRun:
    """What a loopback deployment and a simulation share: the processes they started, the ``flwr`` CLI home,
    waiting for a run, stopping everything (also as a context manager)."""

    home: Path
    processes: list
    connection: str

    def wait(self, run_id: int, timeout: float = 1800.0, on_poll=None, poll: float = 10.0,
             done_file: Path | None = None, finished: bool = True) -> dict:
        return wait_for_run(self.home / "cli", self.connection, run_id, timeout, poll=poll, on_poll=on_poll,
                            done_file=done_file, finished=finished)

    #: seconds a process may take to exit after SIGTERM before it is killed (SIGKILL, that process only)
    stop_grace: float = 15.0

    def stop(self) -> None:
        """SIGTERM every SuperNode at once and wait for them, then stop the SuperLink (one after another cost
        ~0.5 s per site). Each waits at most :attr:`stop_grace` seconds after its SIGTERM."""
        link = [p for p in self.processes if p.name == "superlink"]
        zygote = [p for p in self.processes if p.name == "zygote"]  # last: it forked the others' children
        others = [p for p in reversed(self.processes) if p.name not in ("superlink", "zygote")]
        deadline = time.monotonic() + self.stop_grace
        for proc in others:
            proc.terminate()
        for proc in others:
            proc.stop(max(0.0, deadline - time.monotonic()))
        for proc in link + zygote:
            proc.stop(self.stop_grace)
        self.processes.clear()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class SiteNode:
    """One site's SuperNode on this machine (loopback deployments, tests, ``fedrad demo``)."""

    name: str
    node_config: dict


@dataclass
class LoopbackDeployment(_FlowerRun):
    """A SuperLink and one SuperNode per site on 127.0.0.1, started and stopped together (insecure loopback).

    With ``database`` the SuperLink keeps its state in ``home/superlink/state.db`` (as ``fedrad coordinator
    start`` does), so :meth:`restart_superlink` keeps the run history. :meth:`kill_site` and
    :meth:`restart_site` crash and restart one site's SuperNode (fault-tolerance tests)."""

    home: Path
    sites: list[SiteNode]
    port: int = 0
    processes: list[Process] = field(default_factory=list)
    connection: str = "fedrad-local"
    database: bool = False
    #: fedrad's fast site runtime (:mod:`fedrad.client.fastpath`); False runs Flower's SuperNode unchanged
    fast: bool = True
    #: the deployment's shared zygote and its socket (fast runtime on a supported Flower), set by :meth:`start`
    zygote: tuple[Process, str] | None = None

    @property
    def stop_grace(self) -> float:
        # A SuperNode unregisters from the SuperLink within ~0.1 s of its SIGTERM, then Flower's local HTTP API
        # waits up to 3 s for its SuperExec's connection to close; without a database nothing of the SuperLink
        # outlives it either. Only a SuperLink with a database gets the full grace (its state must be flushed).
        return 15.0 if self.database else 1.0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> "LoopbackDeployment":
        self.port = self.port or free_port()
        from fedrad.client import app_trust, fastpath

        # the exact version only (each SuperNode inspects Flower's source itself: 1 s of imports here, before
        # anything starts); first: it imports while the SuperLink starts, and the SuperNodes' launchers wait for it
        if self.fast and app_trust.flower_version() == fastpath.FLOWER_EXACT:
            self.zygote = start_loopback_zygote(self.home)
            self.processes.append(self.zygote[0])
        self._start_superlink(timeout)
        for site in self.sites:
            self._start_site(site)
        write_cli_connection(self.home / "cli", self.connection, self.address)
        return self

    def _start_superlink(self, timeout: float) -> Process:
        db = self.home / "superlink" / "state.db" if self.database else None
        link = start_superlink(self.home / "superlink", port=self.port, database=db, zygote=self.zygote)
        self.processes.insert(0, link)
        wait_for_port("127.0.0.1", self.port, link, timeout)
        return link

    def _start_site(self, site: SiteNode) -> Process:
        proc = start_supernode(self.home / "sites" / site.name, site.name, self.address, free_port(),
                               {"site-name": site.name, **site.node_config}, fast=self.fast, zygote=self.zygote)
        self.processes.append(proc)
        return proc

    def process(self, name: str) -> Process:
        """The live process of ``"superlink"`` or of a site's SuperNode."""
        wanted = name if name == "superlink" else f"supernode {name}"
        for proc in self.processes:
            if proc.name == wanted and proc.alive():
                return proc
        raise KeyError(f"no running process for {name!r}")

    def kill_site(self, name: str) -> float:
        """Crash a site's SuperNode (SIGKILL: no unregistration); returns the monotonic time of the kill."""
        proc = self.process(name)
        proc.kill()
        self.processes.remove(proc)
        return time.monotonic()

    def stop_site(self, name: str) -> None:
        """Stop a site's SuperNode cleanly (SIGTERM: it unregisters from the SuperLink at once)."""
        proc = self.process(name)
        proc.stop()
        self.processes.remove(proc)

    def restart_site(self, name: str) -> Process:
        """Start a site's SuperNode again with its node config and Flower home (a site rejoining)."""
        site = next(s for s in self.sites if s.name == name)
        return self._start_site(site)

    def restart_superlink(self, crash: bool = True, timeout: float = 90.0) -> Process:
        """Restart the coordinator's SuperLink on the same port (``crash``: SIGKILL, else SIGTERM). Only with
        ``database`` does the new SuperLink know the earlier runs and nodes."""
        old = self.process("superlink")
        if crash:
            old.kill()
        else:
            old.stop()
        self.processes.remove(old)
        return self._start_superlink(timeout)

    def runs(self) -> list[dict]:
        return list_runs(self.home / "cli", self.connection)

    @property
    def coordinator_home(self) -> Path:
        """The coordinator's home: run tickets and its signing key (:attr:`coordinator_key`)."""
        return self.home / "superlink"

    @property
    def coordinator_key(self) -> str:
        """The public signing key a plan names (``[coordinator] key``) for its requests to be signed here."""
        from fedrad.common.signing import ensure_key

        return ensure_key(self.coordinator_home)[0].public

    def submit(self, run_config: dict) -> int:
        """``flwr run`` with ``plan`` and ``out-dir`` of ``run_config`` in the run's ticket."""
        app_dir = write_app(self.home / "app")
        return flwr_run(app_dir, self.home / "cli", self.connection, run_config, ticket_home=self.coordinator_home)


@dataclass
class SimulationRun(_FlowerRun):
    """Flower's simulation engine (Ray) with ``n_sites`` virtual SuperNodes, on a SuperLink this class starts and
    stops (not the shared ``:local:`` one). Virtual sites are named ``site1..siteN`` from their partition id;
    their work directories live under ``sim-root`` (run config) and their tables come from the plan."""

    home: Path
    n_sites: int
    port: int = 0
    processes: list[Process] = field(default_factory=list)
    connection: str = "fedrad-sim"

    def start(self, timeout: float = 90.0) -> "SimulationRun":
        self.port = self.port or free_port()
        link = start_superlink(self.home / "superlink", port=self.port, simulation=True)
        self.processes.append(link)
        wait_for_port("127.0.0.1", self.port, link, timeout)
        write_cli_connection(self.home / "cli", self.connection, f"127.0.0.1:{self.port}")
        return self

    def submit(self, run_config: dict) -> int:
        app_dir = write_app(self.home / "app")
        return flwr_run(app_dir, self.home / "cli", self.connection,
                        {**run_config, "sim-root": str(self.home / "sites")},
                        federation_config={"num-supernodes": self.n_sites}, ticket_home=self.home / "superlink")

