"""App pinning at a site: a fedrad SuperNode runs fedrad's own thin Flower app and nothing else.

Why (issue 11): open-source Flower 1.42's Control API (``flwr run``) has no authentication and is served on the
SuperLink's one port, which every site must reach. Anyone who can reach that port can submit a FAB, and every
SuperNode installs and imports it: arbitrary code at the hospital, next to the feature table.

Flower's own remedy, ``flower-supernode --trusted-entities``, cannot work for an app submitted with ``flwr run``:
the open-source SuperLink attaches verifications only to apps fetched from Flower Hub
(``superlink/servicer/control/control_handlers.py`` ``_start_run``: ``verification_dict`` stays ``{}`` for
``request.fab.content``), and a SuperNode with trusted entities refuses every FAB without ``valid_license``
(``supernode/start_client_internal.py`` ``_pull_and_store_message``). So fedrad pins the app itself:

* The SuperNode's SuperExec starts every task process **by name from PATH**
  (``supercore/constant.py`` ``TASK_TYPE_TO_COMMAND``, ``supercore/superexec/executor/subprocess_executor.py``
  ``SubprocessExecutor.launch``). :func:`install_launchers` writes fedrad launchers for all those names into the
  site's Flower home and :func:`pinned_env` puts them first on the SuperNode's PATH (and checks that each name
  resolves to them, else the node is not started).
* ``flwr-clientapp`` becomes :func:`clientapp_main`: Flower's own ``flwr-clientapp`` entry point
  (``supernode/cli/flwr_clientapp.py``), with :func:`check_fab` run on the FAB the moment Flower pulls it
  (``run_clientapp.pull_task_input``) and before ``install_from_fab`` unpacks it or the ClientApp is loaded.
  Anything but fedrad's app raises :class:`UntrustedApp` there: Flower answers the message with an error reply
  (code 2, CLIENT_APP_RAISED_EXCEPTION), and a line goes to the SuperNode log and to ``refused-apps.log`` in the
  site's Flower home. The foreign FAB is never extracted, its modules never imported.
* Every other task command (``flwr-agentapp``, ``flwr-serverapp``, ``flwr-simulation``, ``flwr-model``,
  ``flwr-connector``) is refused outright: a site runs ClientApps only.

The check is exact: the FAB must hold exactly the files of Flower's own build of
:func:`fedrad.server.runtime.app_pyproject` for the fedrad version installed at the site (``pyproject.toml`` and
Flower's ``.info/CONTENT`` manifest), its pyproject.toml must parse to the same TOML document (so the components
are ``fedrad.server.server_app:app`` / ``fedrad.client.client_app:app`` and the version is this site's), the
manifest must match the file, and the run's FAB id, version and hash must agree with the content. The hooks
depend on Flower 1.42 internals, so they are enabled only on Flower 1.42.x (:func:`flower_supported`); on any
other version the launcher refuses every task (fail closed).
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import io
import os
import shutil
import sys
import tomllib
import zipfile
from pathlib import Path

FLOWER_SERIES = "1.42"
FAB_CONFIG_FILE = "pyproject.toml"
FAB_MANIFEST = ".info/CONTENT"
MAX_FAB_BYTES = 64 * 1024  # fedrad's thin FAB is < 2 KiB
#: every command a SuperExec may start (Flower 1.42 ``TASK_TYPE_TO_COMMAND``); only the first one is allowed
TASK_COMMANDS = ("flwr-clientapp", "flwr-agentapp", "flwr-serverapp", "flwr-simulation", "flwr-model",
                 "flwr-connector")
REFUSAL_LOG = "refused-apps.log"


class UntrustedApp(Exception):
    """A run's FAB is not fedrad's app (or the pin cannot be enforced); the message says why."""


# ----------------------------------------------------------------------------------------------- versions
def flower_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flwr")
    except PackageNotFoundError:
        return "not installed"


def flower_supported(version: str | None = None) -> bool:
    """True for Flower 1.42.x, the only series whose internals the launcher hooks were written against."""
    v = flower_version() if version is None else version
    return v == FLOWER_SERIES or v.startswith(FLOWER_SERIES + ".")


# ----------------------------------------------------------------------------------------------- the check
def fab_members(content: bytes) -> dict[str, bytes]:
    """A FAB's files by name; raises :class:`UntrustedApp` for anything that is not a plain, small zip."""
    if not isinstance(content, (bytes, bytearray)) or len(content) > MAX_FAB_BYTES:
        raise UntrustedApp(f"FAB of {len(content) if isinstance(content, (bytes, bytearray)) else '?'} bytes "
                           f"(fedrad's app is a few hundred; limit {MAX_FAB_BYTES})")
    try:
        with zipfile.ZipFile(io.BytesIO(bytes(content))) as zf:
            infos = zf.infolist()
            names = [i.filename for i in infos]
            if len(names) != len(set(names)):
                raise UntrustedApp(f"FAB has duplicate entries: {sorted(names)}")
            if sum(i.file_size for i in infos) > MAX_FAB_BYTES:
                raise UntrustedApp("FAB unpacks to more than the size limit")
            return {i.filename: zf.read(i) for i in infos}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise UntrustedApp(f"FAB is not a valid zip archive: {exc}") from None


@functools.lru_cache(maxsize=1)
def expected_fab() -> bytes:
    """Flower's own build (``flwr run`` packs apps with the same function) of fedrad's thin app: built once per
    process (a fast site's zygote builds it before forking, so no ClientApp rebuilds it: ~35 ms of imports and
    zipping per message). It follows the installed fedrad version, which a running SuperNode keeps until its
    restart (a newer coordinator's app is refused meanwhile: fail closed)."""
    from flwr.cli.build import build_fab_from_files

    from fedrad.server.runtime import app_pyproject

    fab, _ = build_fab_from_files({FAB_CONFIG_FILE: app_pyproject().encode()})
    return fab


def _toml(data: bytes, what: str) -> dict:
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UntrustedApp(f"{what} is not valid TOML: {exc}") from None


def check_fab(content: bytes, *, fab_hash: str | None = None, fab_id: str | None = None,
              fab_version: str | None = None, expected: bytes | None = None) -> None:
    """Return quietly if ``content`` is fedrad's thin app for the installed fedrad version, else raise
    :class:`UntrustedApp` with the first difference. ``fab_hash``/``fab_id``/``fab_version``: what the run
    claims (Flower's ``Fab.hash_str``, ``Run.fab_id``, ``Run.fab_version``); each must agree with the content."""
    from fedrad.server.runtime import APP_COMPONENTS, APP_ID, app_version

    want = fab_members(expected if expected is not None else expected_fab())
    got = fab_members(content)
    if set(got) != set(want):
        extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        raise UntrustedApp("FAB files differ from fedrad's app"
                           + (f"; extra: {', '.join(extra[:10])}" if extra else "")
                           + (f"; missing: {', '.join(missing)}" if missing else ""))
    cfg, want_cfg = _toml(got[FAB_CONFIG_FILE], FAB_CONFIG_FILE), _toml(want[FAB_CONFIG_FILE], "fedrad's app")
    flwr_app = cfg.get("tool", {}).get("flwr", {}).get("app", {}) if isinstance(cfg.get("tool"), dict) else {}
    components = flwr_app.get("components") if isinstance(flwr_app, dict) else None
    if components != APP_COMPONENTS:
        raise UntrustedApp(f"components {components!r} are not fedrad's {APP_COMPONENTS!r}")
    project = cfg.get("project") if isinstance(cfg.get("project"), dict) else {}
    got_id = f"{flwr_app.get('publisher')}/{project.get('name')}"
    if got_id != APP_ID:
        raise UntrustedApp(f"app {got_id!r} is not {APP_ID!r}")
    if project.get("version") != app_version():
        raise UntrustedApp(f"app version {project.get('version')!r} differs from the fedrad installed at this "
                           f"site ({app_version()})")
    if cfg != want_cfg:
        keys = sorted({*cfg, *want_cfg} - {k for k in cfg if cfg.get(k) == want_cfg.get(k)})
        raise UntrustedApp(f"pyproject.toml differs from fedrad's app (in: {', '.join(keys)})")
    data = got[FAB_CONFIG_FILE]
    manifest = f"{FAB_CONFIG_FILE},{hashlib.sha256(data).hexdigest()},{len(data) * 8}".encode()
    if got[FAB_MANIFEST] != manifest:
        raise UntrustedApp("the FAB's .info/CONTENT manifest does not describe its pyproject.toml")
    if fab_hash is not None and fab_hash != hashlib.sha256(bytes(content)).hexdigest():
        raise UntrustedApp("the run's FAB hash does not match the FAB content")
    if fab_id is not None and fab_id != APP_ID:
        raise UntrustedApp(f"the run's app id {fab_id!r} is not {APP_ID!r}")
    if fab_version is not None and fab_version != app_version():
        raise UntrustedApp(f"the run's app version {fab_version!r} is not {app_version()!r}")


# ----------------------------------------------------------------------------------------------- refusals
def record_refusal(what: str, reason: str, run_id=None) -> str:
    """One line on stderr (the SuperNode's log: task processes inherit its output) and in
    ``$FLWR_HOME/refused-apps.log``."""
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    line = f"{stamp} fedrad app pinning REFUSED {what}" + (f" (run {run_id})" if run_id is not None else "") + \
        f": {reason}"
    print(f"ERROR :      {line}", file=sys.stderr, flush=True)
    home = os.environ.get("FLWR_HOME")
    if home:
        try:
            with open(Path(home) / REFUSAL_LOG, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError:
            pass
    return line


# ----------------------------------------------------------------------------------------------- launchers
def _hooks():
    """Flower 1.42's ClientApp runner module, checked to have the names the hooks replace."""
    if not flower_supported():
        raise UntrustedApp(f"app pinning supports Flower {FLOWER_SERIES}.x only, found {flower_version()}")
    import importlib

    # import_module, not `import a.b as m`: flwr.supernode.cli re-exports a *function* named flwr_clientapp
    entry = importlib.import_module("flwr.supernode.cli.flwr_clientapp")
    runner = importlib.import_module("flwr.supernode.runtime.run_clientapp")

    for mod, names in ((runner, ("pull_task_input", "install_from_fab", "get_load_client_app_fn", "run_clientapp")),
                       (entry, ("flwr_clientapp", "run_clientapp"))):
        missing = [n for n in names if not callable(getattr(mod, n, None))]
        if missing:
            raise UntrustedApp(f"Flower {flower_version()} lacks {mod.__name__}.{', '.join(missing)}")
    if entry.run_clientapp is not runner.run_clientapp:
        raise UntrustedApp("flwr-clientapp does not call flwr.supernode.runtime.run_clientapp.run_clientapp")
    return entry, runner


def clientapp_main(argv: list[str] | None = None) -> int:
    """``flwr-clientapp`` at a fedrad site: Flower's own entry point, with the FAB checked before install."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        entry, runner = _hooks()
        expected = expected_fab()
    except Exception as exc:  # fail closed: no hooks, no ClientApp
        record_refusal("every ClientApp", f"the pin cannot be enforced: {exc}")
        return 78
    seen: dict = {}
    pull, install, loader = runner.pull_task_input, runner.install_from_fab, runner.get_load_client_app_fn

    def checked_pull(client):
        message, context, run, fab = pull(client)
        seen.clear()
        seen.update(run=run, fab=fab)
        try:
            check_fab(fab.content, fab_hash=fab.hash_str, fab_id=run.fab_id, fab_version=run.fab_version,
                      expected=expected)
            seen["ok"] = True
        except UntrustedApp as exc:
            seen["refusal"] = record_refusal(f"app {run.fab_id or '?'} {run.fab_version or ''}".strip(), str(exc),
                                             run.run_id)
        return message, context, run, fab

    def checked_install(fab_file, *args, **kwargs):
        if not seen.get("ok") or fab_file is not seen["fab"].content:
            raise UntrustedApp(seen.get("refusal") or "FAB not checked before installation")
        return install(fab_file, *args, **kwargs)

    def checked_loader(*args, **kwargs):
        load = loader(*args, **kwargs)

        def load_checked(*a, **kw):
            if not seen.get("ok"):
                raise UntrustedApp(seen.get("refusal") or "ClientApp load before the FAB check")
            return load(*a, **kw)

        return load_checked

    runner.pull_task_input, runner.install_from_fab = checked_pull, checked_install
    runner.get_load_client_app_fn = checked_loader
    sys.argv = ["flwr-clientapp", *argv]
    entry.flwr_clientapp()
    return 0


def launch_clientapp(argv: list[str] | None = None) -> int:
    """The pinned ``flwr-clientapp`` launcher: in a child of the site's zygote when one serves this SuperNode
    (:mod:`fedrad.client.fastpath`; the child runs :func:`clientapp_main`, nothing else), else in-process."""
    from fedrad.client.fastpath import run_via_zygote  # stdlib-only; None when no zygote serves this node

    argv = sys.argv[1:] if argv is None else list(argv)
    code = run_via_zygote(argv)
    return clientapp_main(argv) if code is None else code


def refuse_main(command: str, argv: list[str] | None = None) -> int:
    """Any task command other than ``flwr-clientapp`` at a site: refused (a site runs ClientApps only)."""
    record_refusal(command, "a fedrad site runs only fedrad's ClientApp")
    return 77


def _launcher_text(command: str) -> str:
    call = "launch_clientapp()" if command == "flwr-clientapp" else f"refuse_main({command!r})"
    return (f"#!{sys.executable}\n"
            "# fedrad app pinning (fedrad.client.app_trust): written by fedrad at SuperNode start; do not edit\n"
            "import sys\n"
            f"from fedrad.client.app_trust import launch_clientapp, refuse_main\n"
            f"sys.exit({call})\n")


def install_launchers(bin_dir: Path) -> Path:
    """Write the launchers for :data:`TASK_COMMANDS` into ``bin_dir`` (0700; scripts 0700, replaced
    atomically); returns ``bin_dir``."""
    if len(sys.executable) > 250 or any(c.isspace() for c in sys.executable):
        raise UntrustedApp(f"interpreter path {sys.executable!r} cannot be used in a script's #! line")
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(bin_dir, 0o700)
    for command in TASK_COMMANDS:
        path = bin_dir / command
        tmp = bin_dir / f".{command}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write(_launcher_text(command))
        os.chmod(tmp, 0o700)
        os.replace(tmp, path)
    return bin_dir


def pinned_env(env: dict, bin_dir: Path) -> dict:
    """``env`` with ``bin_dir`` first on PATH; raises :class:`UntrustedApp` unless every task command then
    resolves to fedrad's launcher (and ``flower-superexec`` to Flower's own)."""
    bin_dir = Path(bin_dir).resolve()
    out = dict(env)
    out["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    for command in TASK_COMMANDS:
        found = shutil.which(command, path=out["PATH"])
        if found is None or Path(found).resolve() != bin_dir / command:
            raise UntrustedApp(f"{command} resolves to {found}, not fedrad's launcher in {bin_dir}")
        if _launcher_text(command) != (bin_dir / command).read_text():
            raise UntrustedApp(f"{bin_dir / command} is not fedrad's launcher")
    if shutil.which("flower-superexec", path=out["PATH"]) is None:
        raise UntrustedApp("flower-superexec not found on PATH")
    return out
