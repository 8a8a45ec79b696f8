"""Fast site runtime on Flower 1.42.0: no per-message process start, no 3-second idle pull (issue 13).

Measured in ../shared/FLOWER-LATENCY.md: a stock Flower round costs >= 3 s of the SuperNode's hard-coded idle
pull (``supernode/start_client_internal.py``: ``time.sleep(3)`` when nothing was pulled, ``time.sleep(0.5)``
while waiting for the ClientApp's reply) plus one fresh ``flwr-clientapp`` process per message (Flower's own
imports ~1 s, fedrad's pandas/scipy ~1 s more; 2-6 s each when several sites share 2 cores). Neither has a
setting. Without editing Flower's files this module removes both, on fedrad's own site processes only:

* :func:`supernode_main` (``python -m fedrad.client.fastpath supernode ARGS``, what
  :func:`fedrad.server.runtime.start_supernode` starts unless ``fast=False`` / ``fedrad site join --stock``) is
  ``flower-supernode ARGS`` with that module's ``time`` replaced by a proxy: the idle ``sleep(3)`` becomes a
  0.2 s poll for :data:`ACTIVE_SECONDS` after the node's last message (then 3 s again: an idle site costs the
  SuperLink what a stock one does), the reply wait's ``sleep(0.5)`` 0.05 s (backing off to 0.25 s while a
  ClientApp runs long), and the object-pull back-off starts at 0.02 s instead of 1 s. It also starts the zygote below (without waiting for its imports: the SuperNode
  registers meanwhile) and hands its socket to the ClientApp launcher.
* The SuperExec the SuperNode starts (``flower-superexec``, looked up on PATH: a shim in the node's 0700 temp
  directory runs :func:`superexec_main`) polls the SuperNode for tasks every 1 s instead of every 0.1 s, and is
  woken at once by a datagram on its "doorbell" socket, which the SuperNode sends when it has stored a message.
  Each 0.1 s poll cost both processes CPU: ~6 % of a core per site, a core for 20 sites on one machine.
  The shim itself asks the zygote below to fork the SuperExec (:func:`superexec_shim`): a fresh SuperExec imports
  Flower for ~1 s of CPU, 3-8 s of wall time while every site of a machine starts at once, and the first round
  trip of a study waited for it (the demo's first round on extracted tables: 4.5-5.1 s before, 1.3-3.3 s after).
* The zygote (:func:`zygote_main`): one process per SuperNode that has already imported Flower's ClientApp
  runner, the scientific stack and the installed fedrad site agent. fedrad's pinned ``flwr-clientapp`` launcher
  (:func:`fedrad.client.app_trust.launch_clientapp`) passes its argv, environment, working directory and
  stdio to it over a Unix socket (directory 0700, peer uid checked) and waits; the zygote forks and the child
  runs exactly what the launcher would have run in-process, :func:`fedrad.client.app_trust.clientapp_main`
  (FAB check first, then Flower's own ``flwr-clientapp`` entry point). Exit status and signals are relayed, so
  the SuperExec sees an ordinary child. When no zygote answers, the launcher runs in-process (stock).
* A loopback deployment (:class:`fedrad.server.runtime.LoopbackDeployment`: the demo, the tests, a rehearsal;
  one operator runs the coordinator and every site on one machine) starts one zygote for all of them
  (``zygote SOCKET PID --loopback``, named to each SuperNode in ``FEDRAD_SHARED_ZYGOTE``, honoured only when the
  SuperLink is on loopback): it forks the SuperNodes themselves (:func:`supernode_launch`), every site's
  SuperExec and ClientApps, the SuperLink's SuperExec and the ServerApp (``flwr-serverapp`` shim). Each site
  imported the same modules in its own SuperNode and zygote, all at the start of a run on the same cores: the
  ServerApp of a 5-site study asked its first question after ~14 s, now after ~4 s (10-round study on small
  tables: 29 -> 16 s wall). A site joining a real federation keeps its own zygote.

All are tied to Flower 1.42.0 internals, so :func:`unsupported` checks the exact version and the source lines
the proxies key on; on anything else the SuperNode runs stock with a one-line notice in its log. Nothing here
changes what a site computes or sends: the default suite runs one study both ways and compares the results.
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import sys
import tempfile
import time

FLOWER_EXACT = "1.42.0"
SOCKET_ENV = "FEDRAD_ZYGOTE_SOCKET"
PID_ENV = "FEDRAD_ZYGOTE_PID"
DOORBELL_ENV = "FEDRAD_TASK_DOORBELL"
#: "SOCKET:PID" of a loopback deployment's one zygote (fedrad.server.runtime.LoopbackDeployment): its SuperNodes
#: use it instead of starting one each
SHARED_ENV = "FEDRAD_SHARED_ZYGOTE"
#: what a fast SuperNode hands down to its SuperExec and ClientApp launchers (removed where it must not reach)
RUNTIME_ENV = (SOCKET_ENV, PID_ENV, DOORBELL_ENV)
#: the SuperExec's task poll once the doorbell below wakes it (Flower's default 1 s; stock fedrad sites 0.1 s)
DOORBELL_FALLBACK_POLL = 1.0
#: after its last message a node polls every ACTIVE_POLL s for this long, then falls back to Flower's 3 s
ACTIVE_SECONDS = 30.0
ACTIVE_POLL = 0.2
REPLY_POLL = 0.05
REPLY_POLL_MAX = 0.25
#: a launcher waits for a zygote that is still importing for as long as it lives and uses CPU (its imports take
#: 1-3 s on an idle machine, more than 20 s seen while many processes share 2 cores), at most this long; one that
#: used no CPU at all for ZYGOTE_STALL_SECONDS is taken for stuck. Either way the launcher then runs in-process.
ZYGOTE_START_SECONDS = 600.0
ZYGOTE_STALL_SECONDS = 120.0
#: each fast SuperNode's folder in the temp directory (sockets, SuperExec shim) and the file naming its owner
DIR_PREFIX = "fedrad-site-"
OWNER_FILE = "supernode.pid"
#: modules the zygote imports once so a forked ClientApp starts in milliseconds: Flower's runner and its HTTP
#: client, the scientific stack, and the installed fedrad ClientApp. fedrad's FAB carries no code (only its
#: pyproject.toml, which the pin checks byte for byte); its components are these installed modules, which
#: Flower's loader takes from sys.modules. A site restarts its SuperNode after upgrading fedrad (until then the
#: pin refuses the new version's FAB: fail closed).
PRELOAD = ("flwr.supernode.cli.flwr_clientapp", "flwr.supernode.runtime.run_clientapp", "flwr.serverapp",
           "flwr.clientapp", "httpx", "httpcore", "numpy", "pandas", "scipy.linalg", "scipy.stats", "scipy.optimize",
           "scipy.special", "pyarrow", "pyarrow.parquet", "pyarrow.dataset",
           "cryptography.hazmat.primitives.asymmetric.ed25519",
           "tomllib", "flwr.cli.build", "flwr.supercore.cli", "flwr.supercore.superexec.run_superexec",
           "fedrad.client.client_app")
#: a loopback deployment's shared zygote also forks the coordinator's ServerApp: Flower's ServerApp runner and
#: fedrad's coordinator (the study, its report; ~3 s of CPU a fresh ServerApp spent before its first round)
LOOPBACK_PRELOAD = ("flwr.superlink.cli.flwr_serverapp", "flwr.superlink.runtime.run_serverapp",
                    "flwr.supernode.cli", "flwr.supernode.start_client_internal", "fedrad.server.server_app",
                    "matplotlib.pyplot")
#: fedrad modules left to the child: image I/O and extraction (SimpleITK, pyradiomics: ~0.4 s of imports on an
#: idle machine, ~8 s seen under load, and ~250 MB per zygote, for the one extraction message of a study) and
#: this module
NOT_PRELOADED = frozenset({"fedrad.client.imaging", "fedrad.client.extract", "fedrad.client.perturb",
                           "fedrad.client.demo_data", "fedrad.client.fastpath"})
_STATUS = struct.Struct("!i")
_SIGNALS = {b"T": signal.SIGTERM, b"I": signal.SIGINT}


def notice(text: str) -> None:
    print(f"INFO :      fedrad fast site runtime: {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- version guard
def unsupported(parts: tuple[str, ...] = ("supernode", "superexec")) -> str | None:
    """None when this Flower is exactly the one the proxies were written against, else why not (``parts``:
    which modules to inspect: the SuperNode's and/or the SuperExec's)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("flwr")
    except PackageNotFoundError:
        return "Flower is not installed"
    if found != FLOWER_EXACT:
        return f"written for Flower {FLOWER_EXACT}, found {found}"
    try:
        import importlib
        import inspect

        if "supernode" in parts:
            sci = importlib.import_module("flwr.supernode.start_client_internal")
            importlib.import_module("flwr.supernode.cli").flower_supernode  # noqa: B018
            if getattr(sci, "time", None) is not time:
                return "flwr.supernode.start_client_internal no longer uses the time module"
            for name in ("_pull_and_store_message", "_push_messages", "pull_objects", "start_client_internal"):
                if not callable(getattr(sci, name, None)):
                    return f"flwr.supernode.start_client_internal lacks {name}"
            if "time.sleep(3)" not in inspect.getsource(sci.start_client_internal):
                return "the SuperNode's idle pull is no longer time.sleep(3)"
            if "time.sleep(0.5)" not in inspect.getsource(sci._push_messages):
                return "the SuperNode's reply wait is no longer time.sleep(0.5)"
            if '["flower-superexec"]' not in inspect.getsource(sci.start_client_internal):
                return "the SuperNode no longer starts flower-superexec by name"
        if "superexec" in parts:
            rse = importlib.import_module("flwr.supercore.superexec.run_superexec")
            importlib.import_module("flwr.supercore.cli").flower_superexec  # noqa: B018
            if getattr(rse, "time", None) is not time or not callable(getattr(rse, "_handle_launch_result", None)):
                return "flwr.supercore.superexec.run_superexec changed"
            if "time.sleep(task_poll_interval)" not in inspect.getsource(rse.run_superexec):
                return "the SuperExec's task poll is no longer time.sleep(task_poll_interval)"
    except Exception as exc:  # any surprise: stock behaviour
        return f"cannot inspect Flower's SuperNode: {exc}"
    return None


# ------------------------------------------------------------------------------------------- SuperNode
class _NodeClock:
    """Stands in for the ``time`` module inside ``flwr.supernode.start_client_internal``."""

    def __init__(self, real=time):
        self._real = real
        self.last_activity = real.monotonic()

    def __getattr__(self, name):
        return getattr(self._real, name)

    def touch(self) -> None:
        self.last_activity = self._real.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds == 3:      # idle pull: nothing was waiting at the SuperLink
            idle = self._real.monotonic() - self.last_activity
            return self._real.sleep(ACTIVE_POLL if idle < ACTIVE_SECONDS else 3)
        if seconds == 0.5:    # waiting for the ClientApp's reply / an object's content: backing off as it runs
            busy = self._real.monotonic() - self.last_activity
            return self._real.sleep(max(REPLY_POLL, min(REPLY_POLL_MAX, 0.1 * busy)))
        return self._real.sleep(seconds)


def patch_supernode() -> _NodeClock:
    """Install the proxy clock and the short object-pull back-off in Flower's SuperNode module."""
    import functools

    import flwr.supernode.start_client_internal as sci

    clock = _NodeClock()
    pull, push = sci._pull_and_store_message, sci._push_messages

    def pull_marked(*args, **kwargs):
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            clock.touch()
            ring_doorbell()
        return run_id

    def push_marked(*args, **kwargs):
        try:
            return push(*args, **kwargs)
        finally:
            clock.touch()

    sci._pull_and_store_message, sci._push_messages = pull_marked, push_marked
    sci.pull_objects = functools.partial(sci.pull_objects, initial_backoff=0.02, backoff_cap=0.5)
    sci.time = clock
    return clock


def _bind_private(sock: socket.socket, path: str) -> None:
    """Bind a Unix socket at ``path`` readable and writable by this user only (mode 0600 from the start)."""
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)


def ring_doorbell() -> None:
    """Wake this SuperNode's SuperExec (:func:`superexec_main`): a message is stored, its task can be acquired."""
    path = os.environ.get(DOORBELL_ENV)
    if not path:
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as bell:
            bell.setblocking(False)
            bell.sendto(b"!", path)
    except OSError:  # the SuperExec is not listening (yet, or any more): its own poll finds the task
        pass


# ------------------------------------------------------------------------------------------- SuperExec
class _ExecClock:
    """Stands in for the ``time`` module inside ``flwr.supercore.superexec.run_superexec``: the task poll's
    sleep ends as soon as the SuperNode rings the doorbell, and is skipped right after a launch (another task
    may be waiting)."""

    def __init__(self, bell: socket.socket, real=time):
        self._real, self._bell = real, bell
        self.launched = False

    def __getattr__(self, name):
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        if self.launched:
            self.launched = False
            return None
        ready, _, _ = select.select([self._bell], [], [], seconds)
        if ready:
            try:
                while self._bell.recv(64):
                    pass
            except OSError:
                pass
        return None


def patch_superexec(path: str) -> _ExecClock:
    """Bind the doorbell at ``path`` and install the clock in Flower's SuperExec module."""
    import flwr.supercore.superexec.run_superexec as rse

    bell = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if os.path.exists(path):
        os.unlink(path)
    _bind_private(bell, path)
    bell.setblocking(False)
    clock = _ExecClock(bell)
    handle = rse._handle_launch_result

    def handled(*args, **kwargs):
        clock.launched = True
        return handle(*args, **kwargs)

    rse._handle_launch_result = handled
    rse.time = clock
    return clock


def superexec_main(argv: list[str] | None = None) -> int:
    """``flower-superexec ARGS`` as the fast SuperNode starts it (a shim on its PATH): woken by the doorbell
    instead of polling the SuperNode every 0.1 s (each poll costs both processes CPU; on a machine hosting many
    sites that adds up to a core), with Flower's 1 s poll as the fallback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    path = os.environ.get(DOORBELL_ENV)
    reason = unsupported(("superexec",)) if path else "no doorbell configured"
    if reason is None:
        try:
            patch_superexec(path)
            os.environ["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(DOORBELL_FALLBACK_POLL)
        except OSError as exc:
            reason = f"cannot bind the doorbell {path}: {exc}"
    if reason is not None:
        notice(f"SuperExec polls as configured (no doorbell): {reason}")
    from flwr.supercore.cli import flower_superexec

    sys.argv = ["flower-superexec", *argv]
    return flower_superexec() or 0


def superexec_shim(argv: list[str] | None = None) -> int:
    """The ``flower-superexec`` the fast SuperNode finds on its PATH: :func:`superexec_main` forked from the
    node's zygote, which has Flower's SuperExec imported already (a fresh SuperExec process imports Flower for
    ~1 s of CPU, several seconds while every site of a machine starts at once); in this process when no
    zygote answers."""
    argv = sys.argv[1:] if argv is None else list(argv)
    code = run_via_zygote(argv, entry="superexec")
    if code is None:
        notice("SuperExec starts as a fresh process: no zygote answered (gone, stuck without using CPU for "
               f"{ZYGOTE_STALL_SECONDS:g} s, or still importing after {ZYGOTE_START_SECONDS:g} s)")
        return superexec_main(argv)
    return code


def _flower_serverapp(argv: list[str]) -> int:
    from flwr.superlink.cli import flwr_serverapp

    sys.argv = ["flwr-serverapp", *argv]
    return flwr_serverapp() or 0


def serverapp_shim(argv: list[str] | None = None) -> int:
    """The ``flwr-serverapp`` a loopback deployment's SuperLink finds on its PATH: Flower's ServerApp forked from
    the deployment's shared zygote (which has Flower's runner and fedrad's coordinator imported); in this process
    when no zygote answers."""
    argv = sys.argv[1:] if argv is None else list(argv)
    code = run_via_zygote(argv, entry="serverapp")
    if code is None:
        notice("ServerApp starts as a fresh process: no zygote answered")
        for name in RUNTIME_ENV:
            os.environ.pop(name, None)
        return _flower_serverapp(argv)
    return code


#: command -> the function its shim runs
SHIMS = {"flower-superexec": "superexec_shim", "flwr-serverapp": "serverapp_shim"}


def install_shims(bindir: str, commands: tuple[str, ...] = ("flower-superexec",)) -> str:
    """Shims for ``commands`` (keys of :data:`SHIMS`) in ``bindir`` (0700); returns ``bindir``."""
    os.makedirs(bindir, mode=0o700, exist_ok=True)
    os.chmod(bindir, 0o700)
    for command in commands:
        shim = os.path.join(bindir, command)
        with open(shim + ".tmp", "w") as f:
            f.write(f"#!{sys.executable}\nimport sys\nfrom fedrad.client.fastpath import {SHIMS[command]}\n"
                    f"sys.exit({SHIMS[command]}())\n")
        os.chmod(shim + ".tmp", 0o700)
        os.replace(shim + ".tmp", shim)
    return bindir


def _install_superexec_shim(directory: str) -> str:
    """A ``flower-superexec`` that runs :func:`superexec_main`, in ``directory/bin``; returns that bin."""
    return install_shims(os.path.join(directory, "bin"))


def pinned_launcher() -> bool:
    """True when ``flwr-clientapp`` on this process's PATH is fedrad's app-pinning launcher (the zygote's
    children run that launcher's code, so the fast path exists only where the pin is on)."""
    import shutil

    from fedrad.client.app_trust import _launcher_text

    found = shutil.which("flwr-clientapp")
    try:
        return found is not None and open(found).read() == _launcher_text("flwr-clientapp")
    except OSError:
        return False


def supernode_main(argv: list[str] | None = None) -> int:
    """``flower-supernode`` with the fast runtime (or stock, with a notice, when :func:`unsupported`).

    The zygote starts first and imports while the SuperNode imports Flower and registers (on a shared machine
    both are CPU-bound: waiting for one before the other costs their sum); a ClientApp launched before the
    zygote listens waits for it (:func:`run_via_zygote`) rather than importing everything a second time."""
    argv = sys.argv[1:] if argv is None else list(argv)
    shared = _shared_zygote(argv)
    os.environ.pop(SHARED_ENV, None)  # not handed down to the SuperExec or the ClientApps
    reason = unsupported()
    zygote = None
    if reason is None and not pinned_launcher():
        reason = "flwr-clientapp on PATH is not fedrad's pinned launcher (app pinning off)"
    if reason is None:
        directory = tempfile.mkdtemp(prefix=DIR_PREFIX)  # 0700, short enough for a Unix socket path
        with open(os.path.join(directory, OWNER_FILE), "w") as f:
            f.write(str(os.getpid()))
        removed = sweep_stale_directories(os.path.dirname(directory))
        if removed:
            notice(f"removed {removed} folder(s) left in {os.path.dirname(directory)} by SuperNodes that were killed")
        if shared:
            # a loopback deployment (one operator runs every site here): its one zygote serves every site
            path, pid = shared
            which = f"the loopback deployment's shared zygote, pid {pid}"
        else:
            path = os.path.join(directory, "clientapp.sock")
            import subprocess

            zygote = subprocess.Popen([sys.executable, "-m", "fedrad.client.fastpath", "zygote", path,
                                       str(os.getpid())], env=dict(os.environ))
            pid, which = str(zygote.pid), f"zygote pid {zygote.pid}"
        os.environ[SOCKET_ENV] = path  # inherited by the SuperExec, then by every flwr-clientapp launcher
        os.environ[PID_ENV] = pid
        os.environ[DOORBELL_ENV] = os.path.join(directory, "doorbell.sock")
        os.environ["PATH"] = _install_superexec_shim(directory) + os.pathsep + os.environ.get("PATH", "")
        patch_supernode()
        notice(f"on (Flower {FLOWER_EXACT}): idle pull {ACTIVE_POLL:g} s for {ACTIVE_SECONDS:g} s after a "
               f"message, pre-forked ClientApps ({which}; a ClientApp launched before it listens waits while it "
               f"imports, at most {ZYGOTE_START_SECONDS:g} s, then starts as a fresh process)")
    else:
        for name in RUNTIME_ENV:
            os.environ.pop(name, None)
        notice(f"off, running stock Flower: {reason}")
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    try:
        return flower_supernode() or 0
    finally:
        if zygote is not None:
            if zygote.poll() is None:
                zygote.terminate()
                try:
                    zygote.wait(2)
                except subprocess.TimeoutExpired:
                    pass
            import shutil

            shutil.rmtree(directory, ignore_errors=True)  # the zygote's cleanup, in case it died without one


def _loopback_superlink(argv: list[str]) -> bool:
    """Whether ``flower-supernode argv`` connects to a SuperLink on this machine's loopback interface."""
    from fedrad.server.runtime import is_loopback_address

    address = next((a.split("=", 1)[1] for a in argv if a.startswith("--superlink=")), None)
    if address is None and "--superlink" in argv[:-1]:
        address = argv[argv.index("--superlink") + 1]
    return address is not None and is_loopback_address(address)


def _shared_zygote(argv: list[str]) -> tuple[str, str] | None:
    """(socket, pid) of the loopback deployment's zygote named in ``FEDRAD_SHARED_ZYGOTE``, when the SuperLink of
    ``flower-supernode argv`` is on loopback; None otherwise (a site of a real federation)."""
    path, _, pid = os.environ.get(SHARED_ENV, "").rpartition(":")
    return (path, pid) if path and pid.isdigit() and _loopback_superlink(argv) else None


def _is_fast_supernode(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        # a SuperNode forked from a loopback deployment's zygote has the zygote's command line
        return b"fedrad.client.fastpath\0supernode" in cmdline or b"fedrad.client.fastpath\0zygote" in cmdline
    except OSError:
        return False


def sweep_stale_directories(tmp: str) -> int:
    """Remove this user's fast-runtime folders whose SuperNode is gone (a SIGKILL, an OOM kill: its zygote died
    with it and cleaned nothing); a folder without an owner file (being created, or not ours) is left alone."""
    removed = 0
    try:
        entries = os.listdir(tmp)
    except OSError:
        return 0
    import shutil

    for name in entries:
        if not name.startswith(DIR_PREFIX):
            continue
        folder = os.path.join(tmp, name)
        try:
            if os.lstat(folder).st_uid != os.getuid() or not os.path.isdir(folder) or os.path.islink(folder):
                continue
            with open(os.path.join(folder, OWNER_FILE)) as f:
                owner = int(f.read().strip() or 0)
        except (OSError, ValueError):
            continue
        if owner > 0 and owner != os.getpid() and not _is_fast_supernode(owner):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def _starting(pid: int) -> bool:
    """Whether the zygote ``pid`` is still alive (not exited, not a zombie its SuperNode has yet to reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.rindex(")") + 2:][:1] not in ("Z", "X")
    except (OSError, ValueError):
        return False


def _cpu_ticks(pid: int) -> int | None:
    """CPU time (user + system, clock ticks) the process ``pid`` has used so far, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2:].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


# ------------------------------------------------------------------------------------------- launcher side
def run_via_zygote(argv: list[str], entry: str = "clientapp") -> int | None:
    """Run ``flwr-clientapp argv`` (``entry="superexec"``: ``flower-superexec argv``) in a child of the zygote;
    its exit status, or None when no zygote answers (the caller then runs in-process). Signals to this process
    are relayed to the child."""
    path = os.environ.get(SOCKET_ENV)
    if not path:
        return None
    try:
        pid = int(os.environ.get(PID_ENV, "0"))
    except ValueError:
        pid = 0
    start = last_progress = time.monotonic()
    ticks = None
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            break
        except OSError:
            sock.close()
            # the socket appears once the zygote has imported: wait for a zygote that is still starting, however
            # long its imports take on a loaded machine, while it is alive and making progress
            now = time.monotonic()
            if not (pid and _starting(pid) and not os.path.exists(path)) or now - start > ZYGOTE_START_SECONDS:
                return None
            used = _cpu_ticks(pid)
            if used != ticks:
                ticks, last_progress = used, now
            elif now - last_progress > ZYGOTE_STALL_SECONDS:
                return None
            time.sleep(0.02 if now - start < 1 else 0.1)
    payload = json.dumps({"argv": list(argv), "env": dict(os.environ), "cwd": os.getcwd(),
                          "entry": entry}).encode()
    socket.send_fds(sock, [_STATUS.pack(len(payload)) + payload], [0, 1, 2])

    def relay(signum, frame):
        try:
            sock.send(b"T" if signum == signal.SIGTERM else b"I")
        except OSError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, relay)
    data = b""
    while len(data) < _STATUS.size:
        try:
            chunk = sock.recv(_STATUS.size - len(data))
        except InterruptedError:
            continue
        if not chunk:
            print("ERROR :      fedrad fast site runtime: the zygote closed before the ClientApp finished",
                  file=sys.stderr, flush=True)
            return 1
        data += chunk
    return _STATUS.unpack(data)[0]


# ------------------------------------------------------------------------------------------- zygote
def _recv_request(conn: socket.socket, entries: tuple[str, ...]) -> tuple[dict, list[int]]:
    conn.settimeout(10)
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    if len(data) < _STATUS.size:
        raise ValueError("short request")
    size = _STATUS.unpack(data[:_STATUS.size])[0]
    if not 0 < size <= 1 << 22:
        raise ValueError(f"bad request size {size}")
    body = data[_STATUS.size:]
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ValueError("truncated request")
        body += chunk
    conn.settimeout(None)
    req = json.loads(body)
    if not (isinstance(req.get("argv"), list) and isinstance(req.get("env"), dict) and isinstance(req.get("cwd"), str)
            and len(fds) == 3 and req.get("entry", "clientapp") in entries):
        raise ValueError("malformed request")
    return req, fds


#: what a zygote's child may run: the pinned ClientApp entry, or the node's SuperExec (which keeps the runtime's
#: environment: it starts the ClientApp launchers, which look for this zygote)
ENTRIES = ("clientapp", "superexec")
#: a loopback deployment's shared zygote (one operator runs the coordinator and every site on one machine) also
#: forks the SuperNodes, the SuperLink's SuperExec (``superexec``) and the ServerApps it starts; a site's own
#: zygote never does
LOOPBACK_ENTRIES = ENTRIES + ("serverapp", "supernode")


def _child(req: dict, fds: list[int]) -> None:
    """In the forked child: become the launcher's process (stdio, cwd, env, argv) and run the pinned entry (or
    the SuperExec)."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in req["env"].items()})
        entry, argv = req.get("entry", "clientapp"), [str(a) for a in req["argv"]]
        if entry not in ("superexec", "supernode"):  # the runtime's sockets reach only what launches others
            for name in RUNTIME_ENV:
                os.environ.pop(name, None)
        if entry == "superexec":
            code = superexec_main(argv)
        elif entry == "supernode":
            code = supernode_main(argv)
        elif entry == "serverapp":
            code = _flower_serverapp(argv)
        else:
            from fedrad.client.app_trust import clientapp_main

            code = clientapp_main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - report and exit like a crashed process
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code if isinstance(code, int) else 1)


def _prctl():
    """Linux's prctl(2), or None."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with(zygote_pid: int, prctl) -> None:
    """In a forked child: SIGTERM when the zygote ends, however it ends (a SIGKILL, the OOM killer). Its normal
    exit stops its children itself, but a loopback deployment's SuperNodes and ServerApp are its children too and
    would otherwise outlive a crashed zygote, orphaned."""
    if prctl is not None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != zygote_pid:  # it ended between the fork and the prctl
        os._exit(1)


def zygote_main(path: str, parent_pid: int, loopback: bool = False) -> int:
    """Serve fork requests on ``path`` until the SuperNode ``parent_pid`` is gone (``loopback``: the shared zygote
    of a loopback deployment, parented by the process that runs it; it also forks the ServerApp)."""
    import importlib

    entries = LOOPBACK_ENTRIES if loopback else ENTRIES
    for name in PRELOAD + (LOOPBACK_PRELOAD if loopback else ()):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    import pkgutil

    import fedrad.client
    import fedrad.common

    packages = [fedrad.client, fedrad.common]
    if loopback:
        import fedrad.server

        packages.append(fedrad.server)
    for package in packages:  # fedrad imports many modules inside functions
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            if info.name in NOT_PRELOADED:
                continue
            try:
                importlib.import_module(info.name)
            except Exception:  # noqa: BLE001 - an optional dependency missing: imported (or not) in the child
                pass
    try:  # every ClientApp checks the run's app against this build: once here, not once per message
        from fedrad.client.app_trust import expected_fab

        expected_fab()
    except Exception:  # noqa: BLE001 - the child builds it again and refuses to run (fail closed) if it fails
        pass

    zygote_pid, prctl = os.getpid(), _prctl()
    # everything imported so far lives as long as the zygote: out of the collector's sight (gc.freeze), a child's
    # collections neither scan these objects nor write to their pages (which would copy them, page by page)
    import gc

    gc.collect()
    gc.freeze()
    directory = os.path.dirname(path)
    os.chmod(directory, 0o700)
    # stopped with its SuperNode's process group: leave through the finally below (socket and directory removed)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    _bind_private(srv, path + ".new")
    srv.listen(64)
    os.rename(path + ".new", path)  # appears only once it accepts connections
    workers: dict[socket.socket, int] = {}  # launcher connection -> child pid
    by_pid: dict[int, socket.socket] = {}
    # a child's exit wakes the select below at once (its status is relayed to the launcher without waiting out
    # the select timeout)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)

    def parent_alive() -> bool:
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return os.getppid() == parent_pid

    def finish(pid: int, status: int) -> None:
        conn = by_pid.pop(pid, None)
        if conn is None:
            return
        workers.pop(conn, None)
        code = os.waitstatus_to_exitcode(status)
        try:
            conn.sendall(_STATUS.pack(code if code >= 0 else 128 - code))
        except OSError:
            pass
        conn.close()

    try:
        while parent_alive():
            ready, _, _ = select.select([srv, wake_r, *workers], [], [], 0.5)
            for sock in ready:
                if sock == wake_r:
                    try:
                        os.read(wake_r, 512)
                    except BlockingIOError:
                        pass
                elif sock is srv:
                    conn, _ = srv.accept()
                    try:
                        peer, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                              struct.calcsize("3i")))
                        if uid != os.getuid():
                            raise PermissionError(f"connection from uid {uid}")
                        req, fds = _recv_request(conn, entries)
                    except (OSError, ValueError) as exc:
                        notice(f"refused a launcher request: {exc}")
                        conn.close()
                        continue
                    for stream in (sys.stdout, sys.stderr):
                        stream.flush()
                    pid = os.fork()
                    if pid == 0:
                        _die_with(zygote_pid, prctl)
                        signal.set_wakeup_fd(-1)
                        os.close(wake_r)
                        os.close(wake_w)
                        srv.close()
                        for other in workers:
                            other.close()
                        conn.close()
                        _child(req, fds)
                    for fd in fds:
                        os.close(fd)
                    workers[conn], by_pid[pid] = pid, conn
                    if req.get("entry") == "superexec":
                        notice(f"SuperExec (shim pid {peer}) forked from the zygote as pid {pid}")
                    elif req.get("entry") in ("serverapp", "supernode"):
                        what = "ServerApp" if req["entry"] == "serverapp" else "SuperNode"
                        notice(f"{what} (launcher pid {peer}) forked from the zygote as pid {pid}")
                    else:
                        notice(f"ClientApp of launcher pid {peer} runs as pre-forked pid {pid}")
                else:
                    pid = workers[sock]
                    try:
                        data = sock.recv(16)
                    except OSError:
                        data = b""
                    try:  # a relayed signal, or the launcher died: stop its child
                        os.kill(pid, _SIGNALS.get(data[-1:], signal.SIGKILL) if data else signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            while by_pid:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                finish(pid, status)
    finally:
        for pid in list(by_pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        srv.close()
        try:
            os.unlink(path)
        except OSError:
            pass
        if os.path.basename(directory).startswith(DIR_PREFIX):  # the SuperNode's mkdtemp, nothing else
            import shutil

            shutil.rmtree(directory, ignore_errors=True)  # doorbell, SuperExec shim
        else:
            try:
                os.rmdir(directory)  # only when empty
            except OSError:
                pass
    return 0


def supernode_launch(argv: list[str]) -> int:
    """``python -m fedrad.client.fastpath supernode ARGS``: the SuperNode forked from a loopback deployment's
    shared zygote (``FEDRAD_SHARED_ZYGOTE``, a loopback SuperLink; a fresh SuperNode imports Flower for ~1.2 s of
    CPU, once per site at the same moment), this process relaying signals and exit status; otherwise (and when
    that zygote does not answer) this process runs :func:`supernode_main`."""
    shared = _shared_zygote(argv)
    if shared:
        # supernode_main sets (or, running stock, removes) both again for what it starts
        os.environ[SOCKET_ENV], os.environ[PID_ENV] = shared
        code = run_via_zygote(argv, entry="supernode")
        if code is not None:
            return code
        notice("SuperNode starts as a fresh process: the loopback deployment's zygote did not answer")
    return supernode_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["supernode"]:
        return supernode_launch(argv[1:])
    if argv[:1] == ["zygote"] and len(argv) in (3, 4) and argv[3:] in ([], ["--loopback"]):
        return zygote_main(argv[1], int(argv[2]), loopback=argv[3:] == ["--loopback"])
    print("usage: python -m fedrad.client.fastpath supernode FLOWER-SUPERNODE-ARGS... | zygote SOCKET PARENT-PID "
          "[--loopback]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
