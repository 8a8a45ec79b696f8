"""The README's "Running a real study across hospitals", command by command, with relative paths as a newcomer
types them: one machine, a coordinator and three sites in their own folders, TLS and node authentication, every
command run as the real `fedrad` program from the folder the README implies. It must run to the report."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fedrad.server.runtime import BIN, free_port
from tests.test_study import make_sites

SITES = ("hosp0", "hosp1", "hosp2")


def _fedrad(cwd: Path, *args, timeout: float = 180) -> subprocess.CompletedProcess:
    res = subprocess.run([str(BIN / "fedrad"), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"fedrad {' '.join(map(str, args))}: {res.stdout}{res.stderr}"
    return res


def _start(cwd: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "fedrad"), *map(str, args)], cwd=cwd, stdout=open(cwd / "out.log", "a"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(path: Path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text():
            return
        time.sleep(0.3)
    raise AssertionError(f"{text!r} not in {path}: {path.read_text() if path.is_file() else 'no file'}")


@pytest.mark.slow  # ~1 min; the default suite's real coordinator with TLS, node auth and a signed study: test_outsider
def test_the_readme_walkthrough_with_relative_paths_runs_to_the_report(tmp_path):
    port, control = free_port(), free_port()
    coord_dir = tmp_path / "coordinator"
    coord_dir.mkdir()
    _, nodes, _ = make_sites(tmp_path / "data", survival=False)
    procs = []
    try:
        # coordinator
        _fedrad(coord_dir, "coordinator", "certs", "--out", "certs", "--host", "localhost")
        procs.append(_start(coord_dir, "coordinator", "start", "--certs", "certs", "--host", "0.0.0.0", "--port",
                            port, "--control-port", control, "--home", "coord"))
        _wait_for(coord_dir / "out.log", "SuperExec pid")
        table = _fedrad(coord_dir, "coordinator", "keys", "--home", "coord").stdout
        (coord_dir / "study.toml").write_text(table + f"""
[study]
name = "walkthrough"
output = "results"
min_sites = 3
[endpoint]
type = "response"
outcome = "response"
{''.join(f'[sites.{s}]' + chr(10) for s in SITES)}
[harmonization]
covariates = ["age", "sex"]
categorical = ["sex"]
[selection]
exclude = ["immune_score", "egfr_mutant"]
[model]
clinical = ["age", "stage"]
grid = [0.01, 0.1, 1.0]
""")
        for name, node in zip(SITES, nodes):
            site = tmp_path / name  # each hospital's own folder; its table stays there
            site.mkdir(exist_ok=True)
            (site / "features.parquet").write_bytes(Path(node["table"]).read_bytes())
            (site / "site.toml").write_text(f'[site]\nname = "{name}"\ntable = "features.parquet"\n'
                                            'workdir = "fedrad-site"\n[policy]\nmin-cell-size = 10\n')
            (site / "ca.crt").write_bytes((coord_dir / "certs" / "ca.crt").read_bytes())  # given by the coordinator
            (site / "study.toml").write_text((coord_dir / "study.toml").read_text())      # published
            _fedrad(site, "site", "keys", "--out", "keys")
            (coord_dir / f"{name}.pub").write_bytes((site / "keys" / "node.pub").read_bytes())
            _fedrad(coord_dir, "coordinator", "register-site", f"{name}.pub", "--name", name, "--home", "coord")
            shown = _fedrad(site, "site", "approve", "study.toml", "--config", "site.toml", "--yes").stdout
            assert "coordinator signing key: SHA256:" in shown and "approved plan" in shown
            procs.append(_start(site, "site", "join", "--config", "site.toml", "--superlink", f"localhost:{port}",
                                "--root-certificates", "ca.crt", "--auth-key", "keys/node"))
            _wait_for(site / "out.log", f"connected to localhost:{port} as {name}")
        res = _fedrad(coord_dir, "study", "run", "study.toml", "--home", "coord", timeout=900)
        assert "pooled external AUC of the radiomic signature" in res.stdout and "verdict" in res.stdout
        results = json.loads((coord_dir / "results" / "results.json").read_text())
        assert sorted(results["sites"]) == list(SITES) and results["external"]
        assert (coord_dir / "results" / "report.html").stat().st_size > 10_000
        for name in SITES:  # every request the sites answered was signed by the coordinator's key
            sessions = list((tmp_path / name / "fedrad-site" / "sessions").glob("*.json"))
            assert len(sessions) == 1 and json.loads(sessions[0].read_text())["plan"] == results["plan_id"]
            audit = _fedrad(tmp_path / name, "site", "audit", "--config", "site.toml").stdout
            assert results["plan_id"][:12] in audit
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
