"""The ``fedrad`` command line: thin wrappers that parse options and call client/server/common.

Command groups: ``site`` (a hospital's site agent), ``coordinator`` (the operator of the Flower
SuperLink), ``study`` (multi-center validation studies), plus ``demo-data`` and ``demo``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from fedrad import __version__
from fedrad.common.text import plural

app = typer.Typer(
    help="fedrad: federated radiomics for multi-center validation studies. "
    "Images and patient rows stay at each hospital; only aggregates travel.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
site_app = typer.Typer(help="Site agent (run at a hospital): check a data manifest, extract radiomic features "
                       "(check, extract, robustness, delta), make its node keys (keys), approve a study plan "
                       "(approve), join the federation (join), verify what left the hospital (audit).",
                       no_args_is_help=True)
coordinator_app = typer.Typer(
    help="Coordinator operator: certificates, the SuperLink, site registration.", no_args_is_help=True)
study_app = typer.Typer(help="Multi-center validation studies: run a study.toml, write its report.",
                        no_args_is_help=True)
app.add_typer(site_app, name="site")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(study_app, name="study")


#: longest error line printed; a longer message (e.g. every site's refusal) ends in " ..."
MAX_ERROR_CHARS = 2000


def _one_line(message: str) -> str:
    """A message as one line: its lines joined with "; ", whitespace runs collapsed, at most MAX_ERROR_CHARS."""
    text = "; ".join(" ".join(line.split()) for line in str(message).splitlines() if line.strip())
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 4].rstrip() + " ..."


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"fedrad: error: {_one_line(message) or 'failed'}", err=True)
    raise typer.Exit(code)


def _os_message(exc: OSError) -> str:
    """An OSError about a path as "PATH: reason" (not "[Errno 17] File exists: 'PATH'")."""
    if exc.filename is None:
        return str(exc)
    where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else str(exc.filename)
    return f"{where}: {exc.strerror or exc.__class__.__name__}"


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the fedrad version and exit.")) -> None:
    if version:
        typer.echo(f"fedrad {__version__}")
        raise typer.Exit(0)


@app.command("demo-data")
def demo_data(
    out: Path = typer.Option(..., "--out", help="Directory to write the synthetic cohort into."),
    sites: int = typer.Option(5, "--sites", min=1, help="Number of hospitals (sites)."),
    patients: int = typer.Option(100, "--patients", min=1, help="Patients per site."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the cohort is deterministic for a seed."),
    scanners_per_site: int = typer.Option(1, "--scanners-per-site", min=1, help="Scanners per site: 1 (default), "
                                          "each site its own scanner; 2 or more, scanner models shared across "
                                          "sites, each site's patients split between its scanners, and a "
                                          "scanner column in the manifests."),
) -> None:
    """Write a synthetic multi-site cohort (NIfTI images + masks, one manifest per site)."""
    from fedrad.client.demo_data import write_demo_cohort

    try:
        manifests = write_demo_cohort(out, n_sites=sites, n_patients=patients, seed=seed, progress=True,
                                      scanners_per_site=scanners_per_site)
    except (FileExistsError, ValueError) as exc:
        _fail(str(exc) if exc.__class__ is not FileExistsError or exc.filename is None else
              f"--out {out}: {exc.strerror} and is not a directory; pass an empty or new directory")
    for m in manifests:
        typer.echo(f"site manifest: {m}")


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("fedrad-demo"), "--out", help="Working directory for data, sites and results."),
    sites: int = typer.Option(5, "--sites", min=3, help="Number of synthetic hospitals."),
    patients: int = typer.Option(100, "--patients", min=20, help="Patients per hospital."),
    endpoint: str = typer.Option("response", "--endpoint", help="response (AUC), survival (C-index) or "
                                 "continuous (the immune score: Pearson r, R², RMSE)."),
    study: str = typer.Option("prediction", "--study", help="prediction (a model of --endpoint, validated leave "
                              "one site out) or association (radiogenomics: every feature x molecular marker)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic cohort."),
    params: str = typer.Option("ct-original", "--params", help="Extraction parameters at the sites: ct-original "
                               "(default, fast), ct (with LoG filters), mr, or a YAML path."),
) -> None:
    """The whole product on this machine: synthetic hospitals, a SuperLink and one SuperNode per site (real
    Flower processes on loopback), extraction at the sites, federated harmonization, selection, models,
    leave-one-site-out validation, and the HTML report."""
    from fedrad.demo import run_demo
    from fedrad.server.report import headline

    if endpoint not in ("response", "survival", "continuous"):
        _fail("--endpoint must be response, survival or continuous")
    if study not in ("prediction", "association"):
        _fail("--study must be prediction or association")
    from fedrad.client.extract import ExtractionError, build_extractor, resolve_params

    try:  # before any Flower process starts (the sites would each refuse the file much later)
        build_extractor(resolve_params(params))
    except ExtractionError as exc:
        _fail(f"--params: {exc}")
    try:
        res = run_demo(out, sites=sites, patients=patients, seed=seed,
                       endpoint="association" if study == "association" else endpoint, params=params,
                       log=lambda line: typer.echo(line, err=True))
    except Exception as exc:  # a failed run is reported in one line; details are in the logs it names
        _fail(" ".join(str(exc).split())[:2000])
    results = res["results"]
    for line in headline(results):
        typer.echo(line)
    typer.echo(f"round trips: {results['round_trips']}; study time {results['seconds']} s; "
               f"demo wall time {res['seconds']} s")
    typer.echo(f"report: {res['report']}")


@site_app.command("check")
def site_check(
    manifest: Path = typer.Argument(..., help="Site data manifest (CSV)."),
    spacing_tol: float = typer.Option(1e-3, "--spacing-tol", help="Relative tolerance for spacing mismatch."),
    origin_tol: float = typer.Option(1e-2, "--origin-tol", help="Absolute tolerance (mm) for origin mismatch."),
    direction_tol: float = typer.Option(1e-3, "--direction-tol", help="Absolute tolerance for direction cosines."),
    outcomes: Optional[str] = typer.Option(
        None, "--outcomes", help="Comma-separated outcome columns that must be present and non-missing."),
) -> None:
    """Validate a manifest without extracting; print every problem; exit 1 if any case is unusable."""
    from fedrad.client.manifest import CheckTolerances, check_manifest, format_problems

    tol = CheckTolerances(spacing_rel=spacing_tol, origin_abs=origin_tol, direction_abs=direction_tol)
    try:
        report = check_manifest(manifest, tolerances=tol,
                                outcome_columns=[c for c in outcomes.split(",") if c] if outcomes else None,
                                progress=True)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(format_problems(report))
    raise typer.Exit(1 if report.unusable_cases else 0)


@site_app.command("extract")
def site_extract(
    manifest: Path = typer.Argument(..., help="Site data manifest (CSV)."),
    params: Optional[str] = typer.Option(
        None, "--params", help="pyradiomics parameter file: 'ct' (default), 'ct-original' (ct without the LoG "
        "filters: 107 features, ~4x faster), 'mr' (shipped files) or a YAML path."),
    out: Path = typer.Option(..., "--out", help="Output table: .parquet or .csv."),
    jobs: int = typer.Option(0, "--jobs", help="Worker processes (default: number of cores)."),
    cache_dir: Optional[Path] = typer.Option(
        None, "--cache-dir", help="Feature cache directory (default: .fedrad-cache next to the manifest)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the feature cache."),
) -> None:
    """Extract pyradiomics features for every case of a manifest (in parallel, cached, crash-safe)."""
    from fedrad.client.extract import extract_manifest

    try:
        result = extract_manifest(manifest, params=params, out=out, jobs=jobs or None,
                                  cache_dir=cache_dir, use_cache=not no_cache, progress=True)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(result.summary())
    raise typer.Exit(0 if result.n_ok > 0 else 1)


@coordinator_app.command("certs")
def coordinator_certs(
    out: Path = typer.Option(..., "--out", help="Directory for ca.crt, server.pem, server.key and ca/ca.key."),
    host: list[str] = typer.Option([], "--host", help="Name or IP sites use to reach the SuperLink (repeatable); "
                                   "localhost, 127.0.0.1 and ::1 are always included."),
    days: int = typer.Option(825, "--days", min=1, max=825, help="Validity of the server certificate in days "
                             "(at most 825)."),
    ca_days: Optional[int] = typer.Option(None, "--ca-days", min=1, max=3650,
                                          help="Validity of the CA in days (default --days; at most 3650)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files."),
) -> None:
    """Create the coordinator's CA and the SuperLink TLS certificate (EC P-384, keys readable by owner only)."""
    from fedrad.server.certs import describe_certificate, make_certificates

    try:
        paths = make_certificates(out, hosts=host, days=days, ca_days=ca_days, overwrite=force)
    except (FileExistsError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(describe_certificate(paths["server_cert"]))
    typer.echo(f"give every site: {paths['ca_cert']}   keep private (never copy): {paths['ca_key']}")
    typer.echo(f"the SuperLink needs only ca.crt, server.pem and server.key: move {paths['ca_key'].parent} "
               "off the SuperLink host (offline) once the certificates are issued")


@coordinator_app.command("keys")
def coordinator_keys(
    home: Path = typer.Option(Path("fedrad-coordinator"), "--home", help="Coordinator home (as for start)."),
) -> None:
    """Print the coordinator's public signing key (created in the home, 0600, when absent) as the [coordinator]
    table to put in study.toml: sites answer only requests signed by it."""
    from fedrad.common.signing import SigningError, ensure_key, fingerprint

    try:
        signer, created = ensure_key(home.resolve())
    except (SigningError, OSError) as exc:
        _fail(str(exc))
    typer.echo(f"{'created' if created else 'existing'} signing key {home.resolve() / 'signing.key'} "
               f"(fingerprint {fingerprint(signer.public)}); add to study.toml:", err=True)
    typer.echo(f'[coordinator]\nkey = "{signer.public}"')


@coordinator_app.command("start")
def coordinator_start(
    home: Path = typer.Option(Path("fedrad-coordinator"), "--home", help="Coordinator state: Flower home, "
                              "SuperLink database (run history survives restarts), CLI connection, signing key, "
                              "run tickets."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address the sites connect to (0.0.0.0 for remote "
                             "sites); it serves Flower's Fleet API only."),
    port: int = typer.Option(9300, "--port", help="The sites' port (Fleet API only)."),
    control_port: int = typer.Option(9301, "--control-port", help="Port on 127.0.0.1 for this host's flwr CLI, "
                                     "`fedrad study run` and the SuperExec (Control and Runtime APIs)."),
    certs: Optional[Path] = typer.Option(None, "--certs", help="Directory from `fedrad coordinator certs`."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain HTTP; refused unless --host is loopback."),
) -> None:
    """Run the coordinator's Flower SuperLink and SuperExec in the foreground: TLS + node authentication off
    loopback, the sites' port serving the Fleet API only, the Control and Runtime APIs on 127.0.0.1, and only
    this coordinator's SuperExec (holding its secret) able to start ServerApps."""
    import ipaddress

    from fedrad.common.signing import ensure_key, fingerprint
    from fedrad.server.runtime import (RuntimeFailure, ensure_secret, start_superexec, start_superlink,
                                       wait_for_port, write_cli_connection)

    loopback = host == "localhost" or _is_loopback(ipaddress, host)
    if insecure and not loopback:
        _fail(f"--insecure is refused for --host {host}: off loopback, use --certs (TLS + node authentication)")
    if not insecure and certs is None:
        _fail("pass --certs DIR (from `fedrad coordinator certs`) or, on loopback only, --insecure")
    if control_port == port:
        _fail(f"--control-port {control_port} equals --port: the sites' port and the coordinator's own port differ")
    home = home.resolve()
    tls = None
    if certs is not None:
        certs = certs.resolve()
        tls = {"ca": certs / "ca.crt", "cert": certs / "server.pem", "key": certs / "server.key"}
        missing = [str(p) for p in tls.values() if not p.is_file()]
        if missing:
            _fail(f"certificate file(s) missing: {', '.join(missing)}; run `fedrad coordinator certs` first")
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(home, 0o700)
    control = f"127.0.0.1:{control_port}"
    write_cli_connection(home / "cli", "fedrad", control, tls["ca"] if tls else None)
    if certs is not None:
        for key in (certs / "ca.key", certs / "ca" / "ca.key"):
            if key.exists():
                typer.echo(f"warning: the CA private key {key} is on the SuperLink host; the SuperLink does not "
                           "need it: move it offline", err=True)
    signer, _ = ensure_key(home)
    secret = ensure_secret(home / "superexec.secret")
    link = start_superlink(home / "superlink", "127.0.0.1", control_port, database=home / "superlink.db", tls=tls,
                           node_auth=tls is not None, coordinator_home=home, fleet_address=f"{host}:{port}",
                           superexec_secret=secret, die_with_parent=True)
    try:
        wait_for_port("127.0.0.1", control_port, link, 90)
    except RuntimeFailure as exc:
        _fail(str(exc).split("\n")[0].rstrip(":") + f"; last lines: {' / '.join(link.tail(3).splitlines())}")
    exe = start_superexec(home / "superexec", control, secret, coordinator_home=home,
                          root_certificates=tls["ca"] if tls else None, parent_pid=link.popen.pid,
                          die_with_parent=True)
    typer.echo(f"SuperLink pid {link.popen.pid}: sites connect to {host}:{port} (Fleet API only, "
               f"{'TLS + node auth' if tls else 'insecure'}); Control and Runtime APIs on {control} (this host); "
               f"log {link.log}", err=True)
    typer.echo(f"SuperExec pid {exe.popen.pid} (SuperExec authentication on); flwr connection: "
               f"FLWR_HOME={home / 'cli'} (name fedrad); coordinator signing key {fingerprint(signer.public)} "
               f"(`fedrad coordinator keys --home {home}` prints the [coordinator] table for study.toml)", err=True)
    _run_coordinator([link, exe])


def _run_coordinator(procs) -> None:
    """Wait for the coordinator's processes; when one exits, or on Ctrl-C / SIGTERM, stop them all."""
    import signal
    import time as _time

    def _stop(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    code = 0
    try:
        while all(p.alive() for p in procs):
            _time.sleep(0.5)
        dead = next(p for p in procs if not p.alive())
        code = dead.popen.returncode or 1
        typer.echo(f"fedrad: error: the coordinator's {dead.name} exited with code {dead.popen.returncode}; "
                   f"log {dead.log}", err=True)
    except KeyboardInterrupt:
        code = 0
    for p in reversed(procs):
        p.stop()
    raise typer.Exit(code)


@coordinator_app.command("register-site")
def coordinator_register_site(
    pubkey: Path = typer.Argument(..., help="The site's public key (`fedrad site keys`)."),
    name: str = typer.Option(..., "--name", help="The site's name."),
    home: Path = typer.Option(Path("fedrad-coordinator"), "--home", help="Coordinator home (as for start)."),
) -> None:
    """Allow a site's SuperNode to connect (Flower node authentication: `flwr supernode register`)."""
    import subprocess

    from fedrad.server.runtime import BIN, flower_env

    if not pubkey.is_file():
        _fail(f"public key {pubkey} not found")
    home = home.resolve()
    if not (home / "cli" / "config.toml").is_file():
        _fail(f"no coordinator in {home}: start it with `fedrad coordinator start --home {home}` first")
    proc = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(pubkey.resolve()), "fedrad", "--name",
                           name], capture_output=True, text=True, env=flower_env(home / "cli"))
    if proc.returncode != 0:
        _fail(f"registration failed: {(proc.stdout + proc.stderr).strip()[-500:]}")
    import re

    from fedrad.server.runtime import record_site

    node = re.search(r"SuperNode (\d+) registered", proc.stdout)
    if node:  # `coordinator status` names the site of each node (Flower's node list has ids only)
        record_site(home, name, int(node.group(1)))
    typer.echo(proc.stdout.strip())


@coordinator_app.command("status")
def coordinator_status(
    home: Path = typer.Option(Path("fedrad-coordinator"), "--home", help="Coordinator home (as for start)."),
) -> None:
    """List the registered sites (online or not, node id, since when) and the SuperLink's runs with their state."""
    from fedrad.server.runtime import RuntimeFailure, list_nodes, list_runs, registered_sites

    home = home.resolve()
    if not (home / "cli" / "config.toml").is_file():
        _fail(f"no coordinator in {home}: start it with `fedrad coordinator start --home {home}`, or pass the "
              "--home it was started with")
    try:
        nodes = list_nodes(home / "cli", "fedrad")
        runs = list_runs(home / "cli", "fedrad")
    except RuntimeFailure as exc:
        _fail(f"{exc} (is `fedrad coordinator start --home {home}` running?)")
    names = {str(v): k for k, v in registered_sites(home).items()}
    online = [n for n in nodes if n.get("status") == "online"]
    typer.echo(f"sites: {len(online)} of {len(nodes)} online")
    for n in sorted(nodes, key=lambda n: (names.get(str(n.get("node-id")), "~"), str(n.get("node-id")))):
        nid = str(n.get("node-id"))
        since = (f"online since {n.get('online-at')}" if n.get("status") == "online"
                 else f"offline since {n.get('offline-at')}" if n.get("offline-at") not in (None, "", "N/A")
                 else "never connected")
        typer.echo(f"  {names.get(nid, '(unnamed)'):<16} node {nid:<20} {n.get('status', '?'):<12} {since}")
    typer.echo(f"runs: {len(runs)}")
    for r in sorted(runs, key=lambda r: str(r.get("pending-at", ""))):
        study = _run_study_name(home, str(r.get("run-id")))
        typer.echo(f"  run {r.get('run-id')}  {r.get('status', '?'):<20} {study}  submitted {r.get('pending-at')}"
                   f"  elapsed {r.get('elapsed')}")


def _run_study_name(home: Path, run_id: str) -> str:
    """The name of the study a run of this coordinator runs (from its ticket), or "" (no ticket: not ours)."""
    import json

    for folder in ("claimed", "tickets"):
        try:
            ticket = json.loads((home / folder / f"{run_id}.json").read_text())
            plan = json.loads(Path(ticket["plan"]).read_text())
            return f"study {(plan.get('config') or {}).get('study', {}).get('name', '?')!r}"
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return "(no ticket of this coordinator)"


#: the SuperNode's local runtime API port when ``site join --port`` is not given and it is free (Flower's default)
DEFAULT_SITE_PORT = 9094
#: seconds after which ``site join`` says that its SuperNode has not registered yet
REGISTRATION_NOTICE_SECONDS = 20.0


@site_app.command("join")
def site_join(
    superlink: str = typer.Option(..., "--superlink", help="Coordinator address HOST:PORT."),
    config: Optional[Path] = typer.Option(None, "--config", help="The site's configuration file (site.toml: "
                                          "[site] name/table/workdir, [policy]; see deploy/site.toml)."),
    name: Optional[str] = typer.Option(None, "--name", help="This site's name as the coordinator will see it "
                                       "(overrides [site] name)."),
    table: Optional[Path] = typer.Option(None, "--table", help="The site's feature table (stays here; "
                                         "overrides [site] table)."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Audit log and derived tables (default "
                                           "[site] workdir, else ./fedrad-site)."),
    port: Optional[int] = typer.Option(None, "--port", min=1, max=65535,
                                       help=f"Local port of this SuperNode's runtime API (127.0.0.1 only; default "
                                            f"{DEFAULT_SITE_PORT}, or a free port when {DEFAULT_SITE_PORT} is "
                                            "taken, e.g. by another site on this host)."),
    min_cell_size: Optional[int] = typer.Option(None, "--min-cell-size", min=2,
                                                help="Smallest group this site describes (default 10; with "
                                                     "--config the stricter of the two)."),
    root_certificates: Optional[Path] = typer.Option(None, "--root-certificates", help="The coordinator's ca.crt."),
    auth_key: Optional[Path] = typer.Option(None, "--auth-key", help="This site's private key (`site keys`)."),
    insecure: bool = typer.Option(False, "--insecure", help="Plain HTTP; refused unless the SuperLink is loopback."),
    stock: bool = typer.Option(False, "--stock", help="Run Flower's flower-supernode unchanged: a 3 s idle pull "
                               "and a fresh ClientApp process per message (default: fedrad's fast site runtime "
                               "on Flower 1.42.0, stock with a notice on other versions)."),
) -> None:
    """Run this site's Flower SuperNode in the foreground: it answers the coordinator's requests from its own
    table, under its policy, writing every reply to its audit log. The SuperNode ends with this command, however
    it ends (Ctrl-C, SIGTERM, even kill -9)."""
    import ipaddress

    from fedrad.client.site import Site, SiteFailure
    from fedrad.server.runtime import APP_ID, RuntimeFailure, app_version, free_port, port_in_use, start_supernode

    host = superlink.rsplit(":", 1)[0].strip("[]")
    loopback = host == "localhost" or _is_loopback(ipaddress, host)
    if insecure and not loopback:
        _fail(f"--insecure is refused for SuperLink {superlink}: use --root-certificates and --auth-key")
    if not insecure and (root_certificates is None or auth_key is None):
        _fail("pass --root-certificates and --auth-key (TLS + node authentication), or --insecure on loopback")
    for opt, path in (("--root-certificates", root_certificates), ("--auth-key", auth_key)):
        if path is not None and not path.is_file():
            _fail(f"{opt} {path} not found")
    # absolute before Flower sees them (its processes may run from another folder)
    root_certificates = root_certificates.resolve() if root_certificates else None
    auth_key = auth_key.resolve() if auth_key else None
    cfg: dict = {"config": str(config.resolve())} if config else {}
    if name:
        cfg["site-name"] = name
    if table:
        cfg["table"] = str(table.resolve())
    if workdir or not config:
        cfg["workdir"] = str((workdir or Path("fedrad-site")).resolve())
    if min_cell_size is not None:
        cfg["min-cell-size"] = min_cell_size
    try:  # the same reading the SuperNode will do on every request: fail here, with the reason, not later
        site = Site.from_node_config(cfg)
    except SiteFailure as exc:
        _fail(str(exc))
    if site.table_path is None or not site.table_path.is_file():
        _fail(f"feature table {site.table_path} not found" if site.table_path else
              "no feature table: pass --table or set [site] table in --config")
    site.workdir.mkdir(parents=True, exist_ok=True)
    cfg.setdefault("site-name", site.name)
    if port is not None and port_in_use(port):
        _fail(f"port {port} is in use (another site on this host?); pass another --port N, or leave --port out "
              "to use a free one")
    if port is None:
        port = DEFAULT_SITE_PORT
        if port_in_use(port):
            port = free_port()
            typer.echo(f"site {site.name}: port {DEFAULT_SITE_PORT} is in use (another site on this host?); the "
                       f"SuperNode's local runtime API uses free port {port} (pass --port N to choose)", err=True)
    log = site.workdir / "flower" / "supernode.log"
    offset = log.stat().st_size if log.is_file() else 0  # the log is appended to: this run's part starts here
    try:  # app pinning is always on: off loopback the node does not start without it
        proc = start_supernode(site.workdir / "flower", site.name, superlink, port, cfg,
                               root_certificates=root_certificates, auth_key=auth_key, fast=not stock,
                               die_with_parent=True)
    except RuntimeFailure as exc:
        _fail(str(exc))
    from fedrad.client.app_trust import flower_supported

    typer.echo(f"site {site.name}: runs only fedrad's app {APP_ID} {app_version()} (app pinning; refusals in "
               f"{site.workdir / 'flower' / 'refused-apps.log'})" if flower_supported() else
               f"site {site.name}: WARNING: loopback SuperLink and a Flower version app pinning does not support: "
               "any app submitted to the SuperLink runs here", err=True)
    typer.echo(f"site {site.name}: policy {site.policy.describe()}", err=True)
    typer.echo(f"SuperNode pid {proc.popen.pid} for site {site.name} -> {superlink} (local port {port}); "
               f"log {proc.log}", err=True)
    _run_site_foreground(proc, site.name, superlink, offset)


def _run_site_foreground(proc, name: str, superlink: str, offset: int) -> None:
    """Wait for a site's SuperNode: say once it registered (its node id, from its log after ``offset``), stop it
    cleanly on Ctrl-C, SIGTERM or SIGHUP, and when it ends by itself fail with the line of its log that says why.
    A kill -9 of this command ends the SuperNode too (``die_with_parent``)."""
    import signal
    import subprocess
    import time

    from fedrad.server.runtime import exit_reason, supernode_node_id

    def _stop(_signum, _frame):
        raise KeyboardInterrupt

    def new_log() -> str:
        try:
            with open(proc.log, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    started, node, noticed = time.monotonic(), None, False
    try:
        while True:
            try:
                code = proc.popen.wait(None if node is not None else 0.25)
                break
            except subprocess.TimeoutExpired:
                pass
            node = supernode_node_id(new_log())
            if node is not None:
                typer.echo(f"connected to {superlink} as {name} (node id {node})", err=True)
            elif not noticed and time.monotonic() - started > REGISTRATION_NOTICE_SECONDS:
                noticed = True
                typer.echo(f"site {name}: not registered with {superlink} yet, the SuperNode keeps trying (last "
                           f"log line: {exit_reason(new_log()) or '-'}; log {proc.log})", err=True)
    except KeyboardInterrupt:
        proc.stop()
        typer.echo(f"site {name}: SuperNode stopped", err=True)
        raise typer.Exit(0)
    if code != 0:
        reason = exit_reason(new_log()) or "no reason in its log"
        _fail(f"site {name}: the SuperNode exited with code {code}: {reason}; log {proc.log}",
              code if 0 < code < 256 else 1)
    typer.echo(f"site {name}: the SuperNode ended (exit 0); log {proc.log}", err=True)


def _run_foreground(proc) -> None:
    """Wait for a Flower process started by a wrapper command; Ctrl-C or SIGTERM stops it cleanly (SIGTERM
    lets a SuperNode unregister at once)."""
    import signal

    def _stop(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        code = proc.popen.wait()
    except KeyboardInterrupt:
        proc.stop()
        code = 0
    raise typer.Exit(code)


def _is_loopback(ipaddress, host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@site_app.command("keys")
def site_keys(
    out: Path = typer.Option(..., "--out", help="Directory for the key pair."),
    name: str = typer.Option("node", "--name", help="File name of the private key (<name>.pub for the public)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files."),
) -> None:
    """Create this site's SuperNode authentication key pair (EC P-384, OpenSSH format)."""
    from fedrad.client.keys import make_node_keys, public_key_fingerprint

    try:
        private, public = make_node_keys(out, name, overwrite=force)
    except (FileExistsError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"private key (stays here, 0600): {private}")
    typer.echo(f"public key (send to the coordinator): {public}")
    typer.echo(f"fingerprint (confirm by phone before registration): {public_key_fingerprint(public)}")


@site_app.command("audit")
def site_audit(
    log: Optional[Path] = typer.Argument(None, help="audit.jsonl or the site's work directory (default: "
                                         "./audit.jsonl, then ./fedrad-site/audit.jsonl, the work directory of "
                                         "`site join` without --config, then ./.fedrad-site/audit.jsonl)."),
    config: Optional[Path] = typer.Option(None, "--config", help="The site's site.toml: the log in its work "
                                          "directory, as `site join --config` uses it ([site] workdir; without "
                                          "it .fedrad-site next to the table)."),
    key: Optional[Path] = typer.Option(None, "--key", help="The site's audit key (default: audit.key next to "
                                       "the log)."),
    no_key: bool = typer.Option(False, "--no-key", help="Check only the plain hash chain, without the key "
                                "(MACs are not checked: a log rewritten with recomputed hashes passes)."),
) -> None:
    """Verify the audit log's hash chain, MACs and anchor, summarize what left the hospital per plan and study
    attempt, and print the last record's hash (compare it with a copy held elsewhere); exit 1 on any problem."""
    from fedrad.client.audit import find_audit_log, summarize_audit, verify_audit

    if config is not None:
        from fedrad.client.site import Site, SiteFailure

        if log is not None:
            _fail(f"pass either the log ({log}) or --config {config}, not both")
        if not config.is_file():
            _fail(f"--config {config} not found; pass the site.toml `fedrad site join --config` uses")
        try:
            log = Site.from_node_config({"site-name": "audit", "config": str(config.resolve())}).workdir
        except SiteFailure as exc:
            _fail(str(exc))
    try:
        path = find_audit_log(log)
    except FileNotFoundError as exc:
        _fail(f"{exc}{f' (the work directory of --config {config})' if config is not None else ''}")
    report = verify_audit(path, key, check_mac=not no_key)
    typer.echo(summarize_audit(path, report=report))
    raise typer.Exit(0 if report.ok else 1)


@site_app.command("approve")
def site_approve(
    plan: Path = typer.Argument(..., help="The coordinator's published plan: study.toml, or its plan JSON."),
    config: Optional[Path] = typer.Option(None, "--config", help="The site's site.toml (its work directory, its "
                                          "table and [columns] allow-list: the screen then lists the site's "
                                          "candidate features)."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="The site's work directory (without --config)."),
    show: bool = typer.Option(False, "--show", help="Print the plan's id and what it asks, without approving."),
    yes: bool = typer.Option(False, "--yes", help="Approve without asking (scripts); without it the command asks "
                             "on the terminal and refuses when there is none."),
    list_features: bool = typer.Option(False, "--list-features", help="List every candidate feature by name."),
    unsigned: bool = typer.Option(False, "--unsigned", help="Approve a study plan that names no [coordinator] key "
                                  "(its requests unsigned: a rehearsal on one machine only)."),
) -> None:
    """Approve a study plan at this site: the site answers only requests of approved plans and takes every
    parameter it checks from this copy (columns, folds, models, penalty grid, rounds). Prints everything the
    plan asks (every name escaped) and asks for confirmation."""
    import sys

    from fedrad.client.approval import ApprovalError, approve_plan, describe_plan, read_plan_file, review_plan
    from fedrad.client.site import Site, SiteFailure
    from fedrad.common.names import shown
    from fedrad.common.plan import plan_id

    try:
        doc = read_plan_file(plan)
        site = None
        if config is not None:
            site = Site.from_node_config({"config": str(config), **({"workdir": str(workdir)} if workdir else {})})
            wd, allowed = site.workdir, site.columns
        else:
            wd, allowed = (workdir or Path.cwd() / "fedrad-site"), None  # site join's default work directory
        rows, table, note = _approval_table(site, doc)
        review = review_plan(doc, allowed, rows, table=table, note=note)
        pid = plan_id(doc)
        where = f"site {shown(site.name)}" if site is not None else f"the site of {wd}"
        typer.echo(f"plan {pid} for {where}:")
        for line in describe_plan(doc, review.columns, review, site=site.name if site else "",
                                  list_features=list_features):
            typer.echo(f"  {line}")
        key = (doc.get("study") or {}).get("coordinator", {}).get("key") if doc.get("task") == "study" else None
        if key:
            from fedrad.common.signing import fingerprint

            typer.echo(f"  coordinator signing key: {fingerprint(key)}\n      {key}\n      the site answers only "
                       "requests signed by it: compare the fingerprint with `fedrad coordinator keys`")
        elif doc.get("task") == "study":
            typer.echo("WARNING: the plan names no [coordinator] key: its requests are not signed, so anyone able "
                       "to run fedrad's app on the SuperLink could ask this site for it")
        for warning in review.warnings:
            typer.echo(f"WARNING: {warning}")
        if show:
            typer.echo(f"plan id: {pid} (not approved: --show)")
            return
        if doc.get("task") == "study" and not key and not unsigned:
            _fail(f"plan {pid[:12]} not approved: it names no [coordinator] key, so the site could not tell the "
                  "coordinator's requests from anyone else's; ask the coordinator for a study.toml with the table "
                  "`fedrad coordinator keys` prints (or pass --unsigned for a rehearsal on one machine)")
        if not yes:
            if not sys.stdin.isatty():
                _fail(f"plan {pid[:12]} not approved: no terminal to ask for confirmation; read the plan above "
                      "(--show) and pass --yes to approve it without a prompt")
            if not typer.confirm(f"approve plan {pid[:12]} at {where}?", default=False):
                _fail(f"plan {pid[:12]} not approved (answered no)")
        pid = approve_plan(Path(wd), doc, allowed_columns=allowed)
    except (ApprovalError, SiteFailure) as exc:
        _fail(str(exc))
    typer.echo(f"approved plan {pid} in {wd}; pin it with approved-plans = [\"{pid}\"] in site.toml [policy]")


def _approval_table(site, plan: dict):
    """``(rows, shown path, note)``: the site's own table of the data source a study plan names for it, to list
    its candidate features at approval (rows None, with the reason in note, when there is none to read)."""
    if site is None or plan.get("task") != "study":
        return None, "", ""
    alias = ((plan["study"].get("sites") or {}).get(site.name) or {}).get("source")
    src = site.sources.get(alias or "default")
    if src is None:
        return None, "", (f"data source {alias!r} is not configured in site.toml" if alias else
                          "no table configured in site.toml")
    if not src.get("table"):
        return None, "", "the source is a manifest: features are extracted at the first request (fedrad site extract "\
                         "writes the table to check them first)"
    from fedrad.client.site import _read_features, read_table

    path = Path(src["table"])
    if not path.is_file():
        return None, "", f"table {path} not found"
    try:
        return read_table(path, _read_features), str(path), ""
    except Exception as exc:  # a table the site cannot read: the approval screen says so, the request would fail
        return None, "", f"table {path} unreadable: {' '.join(str(exc).split())}"


@site_app.command("robustness")
def site_robustness(
    manifest: Path = typer.Argument(..., help="Site data manifest (CSV)."),
    params: Optional[str] = typer.Option(None, "--params", help="'ct' (default), 'ct-original' (no LoG filters), "
                                         "'mr' or a pyradiomics YAML path."),
    out: Path = typer.Option(..., "--out", help="Perturbed feature table (.parquet or .csv): case_id, "
                             "perturbation, features."),
    perturbations: int = typer.Option(4, "--perturbations", min=2, help="Perturbations per case (0 = original)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the perturbation design and noise."),
    jobs: int = typer.Option(0, "--jobs", help="Worker processes (default: number of cores)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Feature cache directory."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the feature cache."),
) -> None:
    """Features of perturbed images (rotation, translation, noise, volume) for ICC(1,1) robustness."""
    from fedrad.client.perturb import extract_perturbed

    try:
        result = extract_perturbed(manifest, params=params, out=out, n_perturbations=perturbations, seed=seed,
                                   jobs=jobs or None, cache_dir=cache_dir, use_cache=not no_cache, progress=True)
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(result.summary())
    raise typer.Exit(0 if result.n_ok > 0 else 1)


@site_app.command("delta")
def site_delta(
    features_table: Path = typer.Argument(..., help="Feature table with a timepoint column (two per case)."),
    out: Path = typer.Option(..., "--out", help="Output table (.parquet or .csv), one row per case."),
    order: Optional[str] = typer.Option(None, "--order", help="The two timepoints, earlier first (e.g. pre,post)."),
    relative: bool = typer.Option(False, "--relative", help="Relative change instead of the difference."),
) -> None:
    """Delta radiomics at the site: per-case change of every feature between two timepoints."""
    from fedrad.client.extract import write_table
    from fedrad.common.delta import delta_features
    from fedrad.local import default_features

    df = _read_table(features_table)
    feats = default_features(df, {"case_id", "timepoint"})
    try:
        res = delta_features(df, feats, order=_csv_list(order) or None,
                             mode="relative" if relative else "difference")
    except ValueError as exc:
        _fail(str(exc))
    write_table(res.table, out, {"delta": f"{res.timepoints[0]}->{res.timepoints[1]}"})
    typer.echo(f"delta features: {out} ({len(res.table)} cases, {res.table.shape[1]} columns, "
               f"{res.timepoints[0]} -> {res.timepoints[1]})")
    for case, reason in res.skipped_cases.items():
        typer.echo(f"skipped case {case}: {reason}", err=True)
    for feat, reason in res.dropped_features.items():
        typer.echo(f"dropped feature {feat}: {reason}", err=True)


def _csv_list(text: Optional[str]) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()] if text else []


def _read_table(path: Path):
    import pandas as pd

    if path.is_dir():
        _fail(f"input table {path} is a directory; pass a .csv or .parquet file")
    if not path.is_file():
        _fail(f"input table {path} not found")
    kind = "Parquet" if path.suffix.lower() == ".parquet" else "CSV"
    try:  # a file that is no table of its kind (pandas' / pyarrow's parser errors are ValueErrors)
        df = pd.read_parquet(path) if kind == "Parquet" else pd.read_csv(path, float_precision="round_trip")
    except (ValueError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _fail(f"input table {path} is not a readable {kind} table ({exc.__class__.__name__}: {reason})")
    if len(df) == 0:
        _fail(f"input table {path} has no rows (columns: {', '.join(map(str, df.columns[:5])) or 'none'})")
    return df


@app.command("harmonize")
def harmonize(
    input: Path = typer.Argument(..., help="Feature table (.csv or .parquet), one row per case."),
    batch_col: str = typer.Option(..., "--batch-col", help="Column naming the batch (site/scanner); several, "
                                  "comma-separated, run nested ComBat: one pass per column in that order."),
    out: Path = typer.Option(..., "--out", help="Output table (.csv or .parquet): same columns and row order."),
    covariates: Optional[str] = typer.Option(None, "--covariates", help="Covariates to preserve, comma-separated."),
    categorical: Optional[str] = typer.Option(None, "--categorical", help="Which covariates are categorical."),
    features: Optional[str] = typer.Option(
        None, "--features", help="Columns to harmonize (default: pyradiomics-named columns, else all numeric)."),
    ref_batch: Optional[str] = typer.Option(None, "--ref-batch", help="Reference batch, left unchanged."),
    nonparametric: bool = typer.Option(False, "--nonparametric", help="Non-parametric empirical Bayes."),
    mean_only: bool = typer.Option(False, "--mean-only", help="Adjust location only, not scale."),
    no_eb: bool = typer.Option(False, "--no-eb", help="No empirical Bayes shrinkage (eb=False)."),
    federated: bool = typer.Option(
        False, "--federated", help="Each batch becomes a site; the federated protocol runs through Flower's "
        "message layer in-process (aggregates only between sites and coordinator)."),
    min_cell_size: Optional[int] = typer.Option(
        None, "--min-cell-size", help="Smallest batch a site describes (default 10 with --federated, else 2)."),
    site_col: Optional[str] = typer.Option(
        None, "--site-col", help="With --federated: the sites are this column's values and --batch-col (e.g. the "
        "scanner model) is one batch across the sites that have it."),
    covbat: bool = typer.Option(False, "--covbat", help="CovBat after ComBat (site effects in the covariance)."),
    covbat_percent_var: float = typer.Option(0.95, "--covbat-percent-var",
                                             help="CovBat: adjust the PCs explaining more than this share."),
    covbat_n_pc: int = typer.Option(0, "--covbat-n-pc", help="CovBat: adjust this many PCs (0: by percent)."),
    smooth: Optional[str] = typer.Option(
        None, "--smooth", help="ComBat-GAM smooth term(s): COLUMN=lower,knot,...,upper (';' between terms), e.g. "
        "age=18,45,55,65,95; values outside the boundaries are clipped to them."),
    smooth_alphas: Optional[str] = typer.Option(
        None, "--smooth-alphas", help="ComBat-GAM: the alpha grid GCV searches per feature, comma-separated "
        "(default 41 values log-spaced over 1 to 1e7)."),
) -> None:
    """ComBat harmonization of a feature table (pooled, or federated with identical results)."""
    from fedrad.client.extract import write_table
    from fedrad.common.combat import CombatError
    from fedrad.local import harmonize_nested
    from fedrad.server.federation import SiteError

    df = _read_table(input)
    batch_cols = _csv_list(batch_col)
    batch_col = batch_cols[0] if batch_cols else batch_col
    cats = _csv_list(categorical)
    covs = list(dict.fromkeys(_csv_list(covariates) + cats))
    ref = ref_batch
    if ref is not None and batch_col in df.columns and df[batch_col].dtype.kind in "if":
        ref = type(df[batch_col].iloc[0].item())(ref_batch)
    if out.suffix.lower() not in (".csv", ".parquet"):
        _fail(f"output {out} must end in .csv or .parquet")
    if site_col and not federated:
        _fail("--site-col needs --federated (pooled ComBat has no sites; --batch-col alone is the batch)")
    terms = {}
    from fedrad.common.smooth import SmoothError, full_knots

    for term in [t for t in (smooth or "").split(";") if t.strip()]:
        name, _, values = term.partition("=")
        try:
            knots = [float(v) for v in values.split(",")]
            terms[name.strip()] = list(full_knots(knots[1:-1], knots[0], knots[-1]))
        except (ValueError, IndexError, SmoothError) as exc:
            _fail(f"--smooth {term!r}: {exc}; write COLUMN=lower,knot,...,upper, e.g. age=18,45,55,65,95")
    grid = None
    if smooth_alphas is not None:
        try:
            grid = [float(v) for v in smooth_alphas.split(",") if v.strip()]
        except ValueError:
            _fail(f"--smooth-alphas {smooth_alphas!r}: write non-negative numbers, comma-separated, e.g. 1,1e3,1e6")
        if not terms:
            _fail("--smooth-alphas needs --smooth (the grid is searched for the smooth terms' penalty)")
    try:
        if ref is not None and len(batch_cols) > 1:
            raise ValueError("--ref-batch names a batch of one column; nested ComBat (several --batch-col) has none")
        result, info = harmonize_nested(
            df, batch_cols, _csv_list(features) or None, covs, cats, ref_batch=ref, eb=not no_eb,
            parametric=not nonparametric, mean_only=mean_only, federated=federated, min_cell_size=min_cell_size,
            log=lambda line: typer.echo(f"coordinator: {line}", err=True), site_col=site_col,
            covbat={"percent_var": covbat_percent_var, "n_pc": covbat_n_pc} if covbat else None,
            smooth=terms or None, smooth_alphas=grid)
    except (CombatError, SiteError, ValueError) as exc:
        _fail(str(exc))
    write_table(result, out, {"harmonization": info["mode"]})
    ref_d = info["reference"]
    n_feat = len(ref_d.get("features", []))
    excluded = ref_d.get("excluded_features") or {}
    mode = (f"federated, {plural(info['round_trips'], 'round trip')}" if info["mode"] == "federated" else "pooled")
    if ref_d.get("covbat"):
        mode += (f"; CovBat: {ref_d['covbat']['n_pc']} PCs ({100 * sum(ref_d['covbat']['explained']):.0f}% of the "
                 "ComBat residual variance)")
    if ref_d.get("smooth"):
        alphas = ref_d.get("smooth_alpha") or []
        mode += (f"; ComBat-GAM smooth {', '.join(ref_d['smooth'])}, GCV alpha per feature "
                 f"{min(alphas):.3g}-{max(alphas):.3g}" if alphas else "")
    typer.echo(f"harmonized: {out} ({n_feat} features x {len(result)} rows, "
               f"{df[batch_col].nunique()} batches, {mode})")
    if len(batch_cols) > 1:
        typer.echo("nested ComBat: " + ", then ".join(f"{c} ({df[c].nunique()} batches)" for c in batch_cols))
    if ref_d.get("smooth") and ref_d.get("smooth_alpha"):
        for line in _smooth_edge_lines(ref_d, grid):
            typer.echo(line)
    if excluded:
        shown = "; ".join(f"{k}: {v}" for k, v in list(excluded.items())[:5])
        typer.echo(f"left unchanged (zero variance): {len(excluded)} features ({shown})")


def _smooth_edge_lines(ref_d: dict, grid: list[float] | None) -> list[str]:
    """Warnings for the features whose GCV alpha sits at the top or bottom of the grid (the optimum may lie
    beyond it): how many, a few of their names, and what to do."""
    from fedrad.common.smooth import DEFAULT_ALPHAS, grid_edges

    grid = list(DEFAULT_ALPHAS) if grid is None else grid
    excluded = ref_d.get("excluded_features") or {}
    names = [f for f in ref_d.get("features", []) if f not in excluded]
    edges = grid_edges(ref_d["smooth_alpha"], names, grid)
    lines = []
    for where, value, meaning, widen in (
            ("top", max(grid), "the stiffest smooth the grid allows (the fit may want a straighter, near-linear "
             "term)", "larger values"),
            ("bottom", min(grid), "the wiggliest smooth the grid allows", "smaller values")):
        hit = edges[where]
        if hit:
            shown = ", ".join(hit[:3]) + (", ..." if len(hit) > 3 else "")
            lines.append(f"warning: {len(hit)} of {len(names)} features sit at the {where} of the GCV alpha grid "
                         f"({value:.3g}: {meaning}), e.g. {shown}; widen the grid with {widen} "
                         "(--smooth-alphas; a study: [harmonization] smooth_alphas)")
    return lines


@app.command("fit")
def fit(
    input: Path = typer.Argument(..., help="Feature table (.csv or .parquet) with a site column."),
    site_col: str = typer.Option(..., "--site-col", help="Column naming each row's site."),
    model: str = typer.Option(..., "--model", help="logistic (binary response), cox (survival, site strata) or "
                              "linear (continuous outcome)."),
    out: Path = typer.Option(..., "--out", help="Model file (JSON)."),
    outcome: Optional[str] = typer.Option(None, "--outcome", help="Outcome column: 0/1 (logistic) or numeric "
                                          "(linear)."),
    time: Optional[str] = typer.Option(None, "--time", help="Survival time column (cox)."),
    event: Optional[str] = typer.Option(None, "--event", help="Event indicator column, 1 = event (cox)."),
    features: Optional[str] = typer.Option(None, "--features", help="Feature columns, comma-separated "
                                           "(radiomic and clinical: a composite model)."),
    feature_prefix: Optional[str] = typer.Option(None, "--feature-prefix",
                                                 help="Use columns starting with these prefixes (comma-separated)."),
    penalty: str = typer.Option("l2", "--penalty", help="l2, l1, elasticnet or none."),
    c: Optional[float] = typer.Option(None, "--C", help="Fix the penalty: logistic: inverse penalty strength "
                                      "(scikit-learn's C); cox: the penalizer (lifelines'); linear: alpha "
                                      "(scikit-learn's ElasticNet; Ridge's alpha is n times it). Default: chosen "
                                      "by inner cross-validation on the data-driven path, as a study does."),
    inner_folds: int = typer.Option(3, "--inner-folds", help="Inner CV folds for the penalty (by case id)."),
    cv_seed: int = typer.Option(0, "--cv-seed", help="Seed of the inner CV folds (the study's [validation] seed)."),
    path_size: int = typer.Option(12, "--path-size", help="Penalty values on the CV path."),
    path_decades: Optional[float] = typer.Option(None, "--path-decades", help="Decades the CV path spans "
                                                 "(default 5 for l2, 3 for l1 / elasticnet)."),
    l1_ratio: Optional[float] = typer.Option(None, "--l1-ratio", help="Elastic-net mixing (0 = L2, 1 = L1)."),
    federated: bool = typer.Option(False, "--federated", help="Each site a site agent; Flower's message layer "
                                   "in-process; only sums, gradients and Hessians leave a site."),
    strategy: str = typer.Option("exact", "--strategy", help="exact (Newton from sufficient statistics, equals "
                                 "the pooled fit) or, approximate, fedavg / fedprox (Flower's strategies; "
                                 "logistic L2 only)."),
    rounds: int = typer.Option(20, "--rounds", help="FedAvg/FedProx rounds."),
    min_cell_size: Optional[int] = typer.Option(None, "--min-cell-size", help="Sites refuse with fewer patients "
                                                "(default 10 with --federated)."),
    secure_aggregation: bool = typer.Option(False, "--secure-aggregation",
                                            help="Exact logistic fit whose every round's sums are combined with "
                                                 "Flower's SecAgg+: the coordinator sees only the total over all "
                                                 "sites (>= 3 sites; same model; see docs/PRIVACY.md)."),
    dp_noise: float = typer.Option(0.0, "--dp-noise", min=0.0,
                                   help="FedAvg/FedProx with central differential privacy: Gaussian noise "
                                        "multiplier z (noise SD z*clip/sites on each round's average; 0 = off)."),
    dp_clip: float = typer.Option(1.0, "--dp-clip", help="DP: L2 norm each site's update is clipped to."),
    dp_delta: float = typer.Option(1e-5, "--dp-delta", help="DP: the delta at which epsilon is reported."),
    dp_epsilon: Optional[float] = typer.Option(None, "--dp-epsilon",
                                               help="DP: target epsilon; sets the noise multiplier that spends "
                                                    "exactly this over --rounds (instead of --dp-noise)."),
) -> None:
    """Fit a penalized logistic, site-stratified Cox or linear model (pooled, or federated with identical
    results)."""
    import json

    from fedrad.local import fit_table, select_features
    from fedrad.server.federation import SiteError

    df = _read_table(input)
    model = model.lower()
    if model not in ("logistic", "cox", "linear"):
        _fail(f"--model {model!r}: use logistic, cox or linear")
    pen = None if penalty.lower() == "none" else penalty.lower()
    if pen not in (None, "l2", "l1", "elasticnet"):
        _fail(f"--penalty {penalty!r}: use l2, l1, elasticnet or none")
    if pen == "elasticnet" and l1_ratio is None:
        _fail("--penalty elasticnet needs --l1-ratio")
    if c is not None and not c > 0 and pen is not None:
        _fail(f"--C {c:g}: the penalty value must be > 0 (or --penalty none)")
    if model == "cox":
        l1 = l1_ratio if l1_ratio is not None else (1.0 if pen == "l1" else 0.0)
        c_eff = 0.0 if pen is None else c
    else:
        l1 = l1_ratio if pen == "elasticnet" else None
        c_eff = c
    if strategy != "exact" and c_eff is None:  # Flower's approximate strategies have no inner CV
        c_eff = 1.0
    if strategy not in ("exact", "fedavg", "fedprox"):
        _fail(f"--strategy {strategy!r}: use exact, fedavg or fedprox")
    if strategy != "exact" and (model != "logistic" or pen != "l2" or not federated):
        _fail("--strategy fedavg/fedprox is available for --model logistic --penalty l2 --federated only")
    if secure_aggregation and (model != "logistic" or not federated or strategy != "exact"):
        _fail("--secure-aggregation is available for the exact federated logistic fit only "
              "(--model logistic --federated --strategy exact)")
    private = dp_noise > 0 or dp_epsilon is not None
    if private and strategy == "exact":
        _fail("--dp-noise/--dp-epsilon apply to --strategy fedavg or fedprox (the exact fit releases exact sums)")
    if private and not (dp_clip > 0 and 0 < dp_delta < 1 and (dp_epsilon is None or dp_epsilon > 0)):
        _fail("DP needs --dp-clip > 0, 0 < --dp-delta < 1 and --dp-epsilon > 0")
    try:
        exclude = {site_col, *(x for x in (outcome, time, event) if x)}
        feats = select_features(df, _csv_list(features), _csv_list(feature_prefix), exclude)
        if strategy != "exact":
            from fedrad.local import fit_fedavg

            fitted, info = fit_fedavg(df, site_col, feats, outcome, C=c_eff, strategy=strategy, rounds=rounds,
                                      min_cell_size=min_cell_size,
                                      log=lambda line: typer.echo(f"coordinator: {line}", err=True),
                                      dp_noise=dp_noise, dp_clip=dp_clip, dp_delta=dp_delta, dp_epsilon=dp_epsilon)
        else:
            fitted, info = fit_table(df, site_col, model, feats, outcome=outcome, time=time, event=event,
                                     penalty=pen, C=c_eff, l1_ratio=l1, federated=federated,
                                     min_cell_size=min_cell_size,
                                     log=lambda line: typer.echo(f"coordinator: {line}", err=True),
                                     cv={"k": inner_folds, "seed": cv_seed, "path_size": path_size,
                                         "path_decades": path_decades},
                                     **({"secure_aggregation": True} if secure_aggregation else {}))
    except (SiteError, ValueError) as exc:
        _fail(str(exc))
    choice = info.pop("penalty_choice", None) or {"method": "fixed", "value": float(c_eff)}
    doc = {"fedrad_model": 1, "fedrad_version": __version__, "model": model, "fit": info,
           "outcome": {"time": time, "event": event} if model == "cox" else {"outcome": outcome},
           "site_col": site_col, "features": feats, "harmonization": None, "params": fitted.to_dict(),
           "penalty_choice": choice, "source": str(input)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    from fedrad.common.messages import to_plain

    tmp.write_text(json.dumps(to_plain(doc), indent=1, allow_nan=False))
    tmp.replace(out)
    if info["mode"] == "pooled":
        mode = "pooled"
    elif info["mode"] == "federated" and info.get("secure_aggregation"):
        mode = (f"federated with SecAgg+, {plural(info['secure_rounds'], 'secure round')} = "
                f"{plural(info['round_trips'], 'round trip')}")
    elif info["mode"] == "federated":
        mode = f"federated, {plural(info['round_trips'], 'round trip')}"
    else:
        mode = f"{info['mode']} (approximate), {plural(info['round_trips'], 'round trip')}"
        if info.get("dp"):
            mode += (f"; central DP: noise multiplier {info['dp']['noise_multiplier']:.4g}, clip "
                     f"{info['dp']['clipping_norm']:g}, epsilon {info['dp']['epsilon']:.3g} at delta "
                     f"{info['dp']['delta']:g} (site level)")
    typer.echo(f"model: {out} ({model}, {len(feats)} features, {len(df)} rows, "
               f"{df[site_col].nunique()} sites, {mode})")
    typer.echo(_penalty_line(model, choice, federated))
    try:
        typer.echo(fitted.summary.to_string(max_rows=30))
    except Exception:  # the summary is a convenience; L1 models report coefficients only
        pass


def _penalty_line(model: str, choice: dict, federated: bool) -> str:
    """How the penalty was set, in one line (and what to do when the CV chose an end of its path)."""
    from fedrad.common.penalty_cv import CRITERION

    name = {"logistic": "C", "cox": "penalizer", "linear": "alpha"}[model]
    if choice["method"] != "cv":
        return f"penalty fixed: {name} = {choice['value']:.4g}"
    best = choice["cv_scores"][choice["index"]]
    line = (f"penalty chosen by {choice['folds']}-fold {'federated ' if federated else ''}CV over a path of "
            f"{len(choice['path'])} values: {name} = {choice['value']:.4g} ({CRITERION[model]} "
            + (f"{2 * best:.4g})" if best is not None else "not available: no site could evaluate an inner fold)"))
    if choice.get("edge") == "weakest":
        line += (f"; the weakest end of the path ({choice['path'][0]:.3g} to {choice['path'][-1]:.3g}): the optimum "
                 "may lie beyond it, widen --path-decades")
    elif choice.get("edge") == "strongest":
        line += "; the strongest end of the path: the features add little over the model at zero"
    return line


@study_app.command("run")
def study_run(
    study_file: Path = typer.Argument(..., help="study.toml (see `fedrad.server.study_config` for every key)."),
    runtime: str = typer.Option("deployment", "--runtime",
                                help="deployment (a running SuperLink and joined sites), simulation (Flower's "
                                     "simulation engine, one virtual site per [sites] entry) or local (every "
                                     "site in this process; the sites' tables must be on this machine)."),
    home: Path = typer.Option(Path("fedrad-coordinator"), "--home", help="Coordinator home (deployment; as for "
                              "`fedrad coordinator start`): its connection, signing key and run tickets."),
    superlink: Optional[str] = typer.Option(None, "--superlink", help="SuperLink control address (deployment; "
                                            "default: the home's connection, 127.0.0.1:9301)."),
    root_certificates: Optional[Path] = typer.Option(None, "--root-certificates",
                                                     help="CA certificate of the SuperLink (TLS; default: the "
                                                          "home's)."),
    expected_sites: int = typer.Option(0, "--expected-sites", help="Sites to wait for (default: [sites] count, "
                                       "else [study] min_sites)."),
    timeout: float = typer.Option(3600.0, "--timeout", help="Seconds to wait for the study to finish "
                                  "(deployment: then its run is stopped on the SuperLink)."),
    connect_timeout: float = typer.Option(300.0, "--connect-timeout", min=1.0,
                                          help="Seconds the coordinator waits for the sites to connect "
                                               "(deployment)."),
) -> None:
    """Run a multi-center validation study; writes results.json and report.html to the study's output."""
    import json

    from fedrad.server.plans import write_json_atomic
    from fedrad.server.report import headline, write_report
    from fedrad.server.study_config import StudyConfigError, load_study

    if runtime == "deployment":  # before anything is written: a study's plan and results are not sent in clear
        from fedrad.server.runtime import is_loopback_address

        if superlink is None and not (home / "cli" / "config.toml").is_file():
            _fail(f"no coordinator in {home.resolve()}: start it with `fedrad coordinator start --home {home}` "
                  "and pass the same --home here (or --superlink HOST:PORT)")
        if superlink is not None and root_certificates is None and not is_loopback_address(superlink):
            _fail(f"--superlink {superlink} is not loopback: pass --root-certificates (the coordinator's ca.crt); "
                  "plain HTTP is allowed on loopback only")
        if root_certificates is not None and not root_certificates.is_file():
            _fail(f"--root-certificates {root_certificates} not found")
    try:
        cfg = load_study(study_file)
    except StudyConfigError as exc:
        _fail(str(exc))
    out = Path(cfg["study"]["output"])
    out.mkdir(parents=True, exist_ok=True)
    dropped: dict[str, str] = {}  # sites a local rehearsal left out for an error in their data
    if runtime == "local":
        from fedrad.local import run_study_in_process

        if not cfg["sites"]:
            _fail("--runtime local needs [sites.NAME] entries with the sites' manifests or tables")
        from fedrad.local import rehearsal_nodes

        from fedrad.server.federation import SiteError
        from fedrad.server.study import StudyError

        from fedrad.server.federation import failure_line

        nodes = rehearsal_nodes(cfg, out / "sites")
        try:  # a site's refusal or a lost quorum: the reasons are in the message (and the sites' local logs)
            results = run_study_in_process(cfg, nodes, log=lambda line: typer.echo(line, err=True))
        except SiteError as exc:
            _fail(failure_line(exc, getattr(exc, "plan_id", None)))
        except StudyError as exc:
            _fail(str(exc))
        write_json_atomic(results, out / "results.json")
        from fedrad.local import data_failures

        dropped = data_failures(results.get("missing_sites") or {})
    elif runtime == "simulation":
        from fedrad.server.runtime import RuntimeFailure, SimulationRun

        if not cfg["sites"]:
            _fail("--runtime simulation needs [sites.NAME] entries with the sites' manifests or tables")
        names = list(cfg["sites"])
        cfg["sites"] = {f"site{i + 1}": src for i, src in enumerate(cfg["sites"].values())}
        for i, name in enumerate(names):
            if name != f"site{i + 1}":
                typer.echo(f"simulation: [sites.{name}] runs as virtual site site{i + 1}", err=True)
        if (cfg.get("coordinator") or {}).get("key"):  # a rehearsal signs with a key of its own SuperLink's
            from fedrad.common.signing import ensure_key

            cfg["coordinator"] = {"key": ensure_key(out / ".flower-sim" / "superlink")[0].public}
        write_json_atomic({"task": "study", "config": cfg}, out / "plan.json")
        from fedrad.local import write_simulation_sites

        write_simulation_sites(cfg, out / ".flower-sim" / "sites")  # the virtual sites' own site.toml + approval
        run_id = None
        try:
            with SimulationRun(out / ".flower-sim", len(names)) as sim:
                run_id = sim.submit({"plan": str(out / "plan.json"), "out-dir": str(out),
                                     "expected-sites": len(names)})
                typer.echo(f"study submitted as Flower run {run_id} (simulation, {len(names)} virtual sites); "
                           f"progress: {out / 'progress.log'}", err=True)
                sim.wait(run_id, timeout, done_file=out / "results.json")
        except RuntimeFailure as exc:  # the ServerApp's own one-line reason when it wrote one
            from fedrad.server.server_app import FAILURE_FILE

            try:
                doc = json.loads((out / FAILURE_FILE).read_text())
                reason = doc.get("error") if doc.get("run_id") == run_id else None
            except (OSError, ValueError, AttributeError):
                reason = None
            _fail(reason or str(exc))
        results = json.loads((out / "results.json").read_text())
    elif runtime == "deployment":
        from fedrad.server.runtime import RuntimeFailure, flwr_run, write_app, write_cli_connection

        home = home.resolve()
        _check_coordinator_key(cfg, home, superlink)
        n = expected_sites or len(cfg["sites"]) or int(cfg["study"]["min_sites"])
        write_json_atomic({"task": "study", "config": cfg}, out / "plan.json")
        flwr_home = home / "cli"
        if superlink is not None:  # an explicit address: this run's own connection
            flwr_home = out / ".flwr"
            write_cli_connection(flwr_home, "fedrad", superlink, root_certificates)
        (out / "progress.log").unlink(missing_ok=True)  # an earlier run's lines are not this run's progress
        try:
            run_id = flwr_run(write_app(out / ".app"), flwr_home, "fedrad",
                              {"plan": str(out / "plan.json"), "out-dir": str(out), "expected-sites": n,
                               "connect-timeout": float(connect_timeout)},
                              ticket_home=home)
        except RuntimeFailure as exc:
            _fail(str(exc))
        typer.echo(f"study submitted as Flower run {run_id}; progress: {out / 'progress.log'}", err=True)
        _follow_deployment_run(flwr_home, run_id, out, timeout)
        results = json.loads((out / "results.json").read_text())
    else:
        _fail(f"--runtime {runtime!r}: use deployment, simulation or local")
    report = write_report(results, out / "report.html")
    for line in headline(results):
        typer.echo(line)
    typer.echo(f"results: {out / 'results.json'}; report: {report}")
    if runtime == "local" and dropped:  # a rehearsal is for finding exactly this before the real study
        _fail("the rehearsal left out " + "; ".join(f"{s}: {r}" for s, r in dropped.items())
              + f" -- fix the data at {', '.join(dropped)} and run the rehearsal again (the results above "
              "are without it)")


class _RunFailed(Exception):
    """The ServerApp wrote its one-line failure (``failure.json``) for this run."""


def _follow_deployment_run(flwr_home: Path, run_id: int, out: Path, timeout: float) -> None:
    """Wait for a deployment run, printing the ServerApp's progress lines (``<out>/progress.log``) as they come:
    waiting for sites, phases, rounds and sites answered, a lost site and the restart. A failed run ends in its
    one-line reason; on timeout (or Ctrl-C) the run is stopped on the SuperLink, so no ServerApp runs on."""
    import json

    from fedrad.demo import _server_log_lines
    from fedrad.server.runtime import RunTimeout, RuntimeFailure, stop_run, wait_for_run
    from fedrad.server.server_app import FAILURE_FILE

    seen = [0]

    def failure() -> str | None:
        try:
            doc = json.loads((out / FAILURE_FILE).read_text())
        except (OSError, ValueError):
            return None
        return str(doc.get("error") or "") if doc.get("run_id") == run_id else None

    def follow(_status=None) -> None:
        lines = _server_log_lines(out)
        if len(lines) < seen[0]:  # the ServerApp started the file afresh: an earlier run's lines were there
            seen[0] = 0
        for line in lines[seen[0]:]:
            if not line.startswith("coordinator: error: "):  # said once, as this command's error line
                typer.echo(line, err=True)
        seen[0] = len(lines)
        if failure() is not None:
            raise _RunFailed()

    try:
        wait_for_run(flwr_home, "fedrad", run_id, timeout, on_poll=follow, done_file=out / "results.json")
        follow()
    except (_RunFailed, RuntimeFailure) as exc:
        reason = failure()
        if reason is None and isinstance(exc, RunTimeout):
            state = stop_run(flwr_home, "fedrad", run_id)
            _fail(f"run {run_id} did not finish within {timeout:.0f} s (--timeout); stopped it on the SuperLink "
                  f"({state or 'status unknown'}); progress: {out / 'progress.log'}")
        if isinstance(exc, _RunFailed):  # the ServerApp is ending: return once Flower has recorded it
            _await_finished(flwr_home, run_id)
        _fail(reason or str(exc).split("\n")[0])
    except KeyboardInterrupt:
        stop_run(flwr_home, "fedrad", run_id)
        _fail(f"interrupted: run {run_id} stopped on the SuperLink", code=130)


def _await_finished(flwr_home: Path, run_id: int, timeout: float = 30.0) -> None:
    """Wait until the SuperLink records the run as finished (its ServerApp has exited); stop it after
    ``timeout`` s, so that no ServerApp of this command outlives it."""
    import time

    from fedrad.server.runtime import RuntimeFailure, run_status, stop_run

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if str(run_status(flwr_home, "fedrad", run_id).get("status", "")).startswith("finished"):
                return
        except RuntimeFailure:
            return
        time.sleep(1.0)
    stop_run(flwr_home, "fedrad", run_id)


def _check_coordinator_key(cfg: dict, home: Path, superlink: str | None) -> None:
    """A deployment's plan must name this coordinator's signing key (sites refuse unsigned requests)."""
    from fedrad.common.signing import KEY_FILE, Signer, SigningError, fingerprint
    from fedrad.server.runtime import is_loopback_address

    key = (cfg.get("coordinator") or {}).get("key")
    if key is None:
        if superlink is not None and is_loopback_address(superlink):
            typer.echo("warning: study.toml names no [coordinator] key: its requests are not signed (a loopback "
                       "rehearsal only; `fedrad site approve` refuses such a plan)", err=True)
            return
        _fail(f"study.toml names no [coordinator] key: sites answer only signed requests; add the table "
              f"`fedrad coordinator keys --home {home}` prints, and ask every site to approve the plan again")
    try:
        held = Signer.load(home).public if (home / KEY_FILE).is_file() else None
    except SigningError as exc:
        _fail(str(exc))
    if held != key:
        _fail(f"study.toml names coordinator key {fingerprint(key)}, but {home} holds "
              f"{fingerprint(held) if held else 'no signing key'}: run from the coordinator home that made the key "
              f"(--home), or put its key in study.toml (`fedrad coordinator keys --home {home}`)")


@study_app.command("init")
def study_init(
    tables: list[Path] = typer.Argument(..., help="One feature table per site (CSV or parquet): the columns the "
                                        "draft names are those every table has."),
    out: Path = typer.Option(Path("study.toml"), "--out", help="The study file to write."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
) -> None:
    """Draft a commented study.toml from the sites' tables: id, outcome candidates, time/event pairs, clinical and
    volume columns detected, every section explained; edit it, then rehearse with --runtime local."""
    from fedrad.server.study_config import StudyConfigError, load_study
    from fedrad.server.study_init import InitError, draft_study

    if out.exists() and not force:
        _fail(f"{out} exists: pass another --out, or --force to overwrite it")
    try:
        text = draft_study(tables, out)
    except InitError as exc:
        _fail(str(exc))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    except OSError as exc:
        _fail(_os_message(exc))
    try:
        load_study(out)
    except StudyConfigError as exc:  # a draft that does not validate is a bug here, not the user's
        _fail(f"the draft {out} does not validate ({exc}); edit it, or report this")
    typer.echo(f"wrote {out}: check [endpoint], [sites] and [coordinator], then "
               f"`fedrad study run {out} --runtime local` to rehearse")


@study_app.command("report")
def study_report(
    results_file: Path = typer.Argument(..., help="results.json of a study."),
    out: Optional[Path] = typer.Option(None, "--out", help="HTML file (default: report.html beside results)."),
) -> None:
    """(Re)write the HTML report of a finished study."""
    from fedrad.server.report import write_report

    results = _read_json(results_file, str(results_file), "the results.json a `fedrad study run` wrote")
    if not isinstance(results, dict) or not isinstance(results.get("endpoint"), dict) \
            or "type" not in results["endpoint"]:
        _fail(f"{results_file} is not a study's results.json (no [endpoint] type); pass the results.json a "
              "`fedrad study run` wrote")
    path = write_report(results, out or results_file.with_name("report.html"))
    typer.echo(f"report: {path}")


def _read_json(path: Path, what: str, wanted: str):
    """The JSON document in ``path``, or a one-line error naming ``what`` it is and which file to pass."""
    import json

    if not path.is_file():
        _fail(f"{what} {'is a directory' if path.is_dir() else 'not found'}; pass {wanted}")
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        _fail(f"{what} is not JSON ({str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__}); "
              f"pass {wanted}")


def load_model(path: Path):
    doc = _read_json(path, f"model file {path}", "the JSON file `fedrad fit --out` wrote")
    if not isinstance(doc, dict) or doc.get("fedrad_model") != 1:
        _fail(f"{path} is not a fedrad model file (no \"fedrad_model\": 1); pass the file `fedrad fit --out` wrote")
    lacking = [k for k in ("model", "features", "params") if k not in doc]
    if lacking or doc["model"] not in ("logistic", "cox", "linear"):
        what = f"lacks {', '.join(lacking)}" if lacking else f"model {doc['model']!r}"
        _fail(f"model file {path} is incomplete or damaged ({what}); fit it again with `fedrad fit`")
    from fedrad.common.cox import CoxError, CoxModel
    from fedrad.common.glm import GLMError, LogisticModel
    from fedrad.common.linear import LinearModel

    try:
        kind = {"logistic": LogisticModel, "cox": CoxModel, "linear": LinearModel}[doc["model"]]
        return doc, kind.from_dict(doc["params"])
    except (GLMError, CoxError, KeyError, TypeError, AttributeError) as exc:
        _fail(f"model file {path}: its parameters are damaged ({exc.__class__.__name__}: {exc}); fit it again "
              "with `fedrad fit`")


@app.command("predict")
def predict(
    model_file: Path = typer.Argument(..., help="Model file written by `fedrad fit`."),
    input: Path = typer.Argument(..., help="A site's own table (.csv or .parquet)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write scores here (default: print)."),
    id_col: str = typer.Option("case_id", "--id-col", help="Identifier column carried into the output."),
) -> None:
    """Score a site's own rows locally with a fitted model (nothing leaves the site)."""
    import numpy as np
    import pandas as pd

    doc, fitted = load_model(model_file)
    df = _read_table(input)
    missing = [f for f in doc["features"] if f not in df.columns]
    if missing:
        _fail(f"{input} lacks feature column(s) {', '.join(missing[:5])} used by the model")
    bad = [f for f in doc["features"] if df[f].isna().any()]
    if bad:
        _fail(f"feature {bad[0]!r} has {int(df[bad[0]].isna().sum())} missing values; impute or drop those rows")
    X = df[doc["features"]]
    res = pd.DataFrame({id_col: df[id_col]} if id_col in df.columns else {"row": np.arange(len(df))})
    if doc["model"] == "logistic":
        res["probability"] = fitted.predict_proba(X)[:, 1]
        res["linear_predictor"] = fitted.decision_function(X)
    elif doc["model"] == "linear":
        res["prediction"] = fitted.predict(X)
    else:
        res["log_partial_hazard"] = np.asarray(fitted.predict_log_partial_hazard(X), dtype=float)
    if out is None:
        typer.echo(res.to_string(index=False))
    else:
        from fedrad.client.extract import write_table

        write_table(res, out, {"model": str(model_file)})
        typer.echo(f"scores: {out} ({len(res)} rows)")


def _expected_error(exc: BaseException) -> Optional[str]:
    """The one-line message of an expected failure, or None for an internal error (shown with its traceback).

    Expected: fedrad's own error types (StudyConfigError, PlanError, SiteError, ApprovalError, ... every class
    defined in a fedrad module: their messages name what to fix) and an OSError about a path (a missing
    directory, a permission, a full disk)."""
    for cls in type(exc).__mro__:
        if cls.__module__.split(".")[0] == "fedrad":
            return str(exc) or cls.__name__
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{_os_message(exc)} (check the path and its permissions)"
    return None


def _keep_brackets(typer_app: typer.Typer) -> None:
    """Escape rich markup in every help text of ``typer_app`` and its groups (their own help, each command's
    docstring or help, each option's and argument's help), once, at import: Typer renders help with rich markup,
    which swallows every "[site]", "[sites.NAME]", "[study] min_sites" written there. Escaped, rich prints them as
    written, and Typer's own "[default: ...]" and "[required]" and its panels stay as they are (with markup off,
    Typer 0.20 prints those as "\\[required]")."""
    import inspect

    from rich.markup import escape
    from typer.models import ParameterInfo

    def params(callback) -> None:
        for param in inspect.signature(callback).parameters.values():
            if isinstance(param.default, ParameterInfo) and isinstance(param.default.help, str):
                param.default.help = escape(param.default.help)

    if isinstance(typer_app.info.help, str):
        typer_app.info.help = escape(typer_app.info.help)
    if typer_app.registered_callback is not None and typer_app.registered_callback.callback is not None:
        params(typer_app.registered_callback.callback)
    for command in typer_app.registered_commands:
        text = command.help if isinstance(command.help, str) else inspect.getdoc(command.callback)
        if text:
            command.help = escape(text)
        params(command.callback)
    for group in typer_app.registered_groups:
        _keep_brackets(group.typer_instance)


_keep_brackets(app)


def main() -> None:
    """The console script: every expected failure (bad input files, a site's refusal, a study that cannot run)
    ends in one line ``fedrad: error: ...`` on stderr and exit status 1, without a traceback; a usage error (an
    unknown option, a missing argument) exits 2 as click's do; an internal error keeps its traceback."""
    import click

    try:
        code = app(standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError:  # the help text is already printed
        sys.exit(2)
    except click.UsageError as exc:  # bad or missing option/argument values
        where = f"; see `{exc.ctx.command_path} --help`" if exc.ctx is not None else ""
        typer.echo(f"fedrad: error: {_one_line(exc.format_message())}{where}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        typer.echo(f"fedrad: error: {_one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        typer.echo("Aborted!", err=True)
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 -- re-raised unless it is an expected failure
        message = _expected_error(exc)
        if message is None:
            raise
        typer.echo(f"fedrad: error: {_one_line(message)}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
