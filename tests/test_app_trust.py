"""App pinning unit tests (client/app_trust.py): the FAB check, the launchers on PATH, the Flower version guard,
and the CLI refusals around it (site join / study run off loopback)."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrad.cli import app as cli_app
from fedrad.client import app_trust
from fedrad.client.app_trust import UntrustedApp, check_fab
from fedrad.server import runtime
from fedrad.server.runtime import APP_PYPROJECT, BIN, app_pyproject, is_loopback_address, write_app


def _build(tmp_path, files: dict[str, str]) -> bytes:
    """A FAB built by Flower itself (what `flwr run` submits) from these files."""
    from flwr.cli.build import build_fab_from_disk

    d = tmp_path / "app"
    for name, text in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    return build_fab_from_disk(d)


def _fedrad_fab(tmp_path) -> bytes:
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(write_app(tmp_path / "fedrad-app"))


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_fedrad_fab_accepted(tmp_path):
    fab = _fedrad_fab(tmp_path)
    assert fab == app_trust.expected_fab()  # byte-identical to what `flwr run` of write_app() sends
    check_fab(fab, fab_hash=hashlib.sha256(fab).hexdigest(), fab_id="fedrad/fedrad-study",
              fab_version=runtime.app_version())


def test_extra_file_refused(tmp_path):
    # even a file that would shadow fedrad's own ClientApp module
    fab = _build(tmp_path, {"pyproject.toml": app_pyproject(), "fedrad/client/client_app.py": "raise SystemExit"})
    with pytest.raises(UntrustedApp, match="extra: fedrad/client/client_app.py"):
        check_fab(fab)


@pytest.mark.parametrize("old,new,match", [
    ('clientapp = "fedrad.client.client_app:app"', 'clientapp = "evil.client_app:app"', "components"),
    ('serverapp = "fedrad.server.server_app:app"', 'serverapp = "fedrad.server.study:app"', "components"),
    ('publisher = "fedrad"', 'publisher = "outsider"', "not 'fedrad/fedrad-study'"),
    ('dependencies = []', 'dependencies = ["evil-package"]', "differs from fedrad's app"),
    ('round-timeout = 600.0', 'round-timeout = 600.0\nextra-key = "x"', "differs from fedrad's app"),
])
def test_changed_pyproject_refused(tmp_path, old, new, match):
    text = app_pyproject()
    assert old in text
    with pytest.raises(UntrustedApp, match=match):
        check_fab(_build(tmp_path, {"pyproject.toml": text.replace(old, new)}))


def test_changed_version_refused(tmp_path):
    other = APP_PYPROJECT.format(version="0.0.9")
    with pytest.raises(UntrustedApp, match="version '0.0.9'"):
        check_fab(_build(tmp_path, {"pyproject.toml": other}))


def test_run_metadata_must_match(tmp_path):
    fab = _fedrad_fab(tmp_path)
    with pytest.raises(UntrustedApp, match="hash"):
        check_fab(fab, fab_hash="0" * 64)
    with pytest.raises(UntrustedApp, match="app id"):
        check_fab(fab, fab_id="outsider/x")
    with pytest.raises(UntrustedApp, match="app version"):
        check_fab(fab, fab_version="9.9.9")


def test_malformed_fabs_refused(tmp_path):
    members = app_trust.fab_members(_fedrad_fab(tmp_path))
    with pytest.raises(UntrustedApp, match="zip"):
        check_fab(b"not a zip")
    with pytest.raises(UntrustedApp, match="bytes"):
        check_fab(b"x" * (app_trust.MAX_FAB_BYTES + 1))
    with pytest.raises(UntrustedApp, match="manifest"):
        check_fab(_zip({**members, ".info/CONTENT": b"pyproject.toml,00,8"}))
    with pytest.raises(UntrustedApp, match="missing"):
        check_fab(_zip({"pyproject.toml": members["pyproject.toml"]}))
    with pytest.warns(UserWarning), pytest.raises(UntrustedApp, match="duplicate"):
        check_fab(_dup(members))


def _dup(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr("pyproject.toml", b"[project]\nname='x'\n")  # a second entry of the same name
    return buf.getvalue()


def test_flower_version_guard(monkeypatch):
    assert app_trust.flower_supported()  # the installed Flower is 1.42.x
    assert app_trust.flower_supported("1.42.7") and not app_trust.flower_supported("1.43.0")
    assert not app_trust.flower_supported("1.420.0") and not app_trust.flower_supported("2.42.0")
    monkeypatch.setattr(app_trust, "flower_version", lambda: "1.43.0")
    with pytest.raises(UntrustedApp, match="1.42"):
        app_trust._hooks()


def test_launchers_first_on_path(tmp_path):
    bin_dir = app_trust.install_launchers(tmp_path / "bin")
    env = app_trust.pinned_env(runtime.flower_env(tmp_path / "home"), bin_dir)
    assert env["PATH"].split(os.pathsep)[0] == str(bin_dir.resolve())
    assert oct(bin_dir.stat().st_mode & 0o777) == "0o700"
    # a non-ClientApp task command is refused, with a line in the site's Flower home
    (tmp_path / "home").mkdir()
    proc = subprocess.run(["flwr-agentapp", "--token", "x"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 77 and "REFUSED flwr-agentapp" in proc.stderr
    assert "REFUSED flwr-agentapp" in (tmp_path / "home" / app_trust.REFUSAL_LOG).read_text()
    # a tampered launcher is detected
    (bin_dir / "flwr-clientapp").write_text("#!/bin/sh\nexec real-flwr-clientapp \"$@\"\n")
    with pytest.raises(UntrustedApp, match="not fedrad's launcher"):
        app_trust.pinned_env(env, bin_dir)


def test_clientapp_launcher_fails_closed_on_other_flower(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    monkeypatch.setattr(app_trust, "flower_version", lambda: "1.50.0")
    assert app_trust.clientapp_main(["--token", "x", "--insecure"]) == 78
    assert "cannot be enforced" in (tmp_path / app_trust.REFUSAL_LOG).read_text()


def test_start_supernode_guards(tmp_path, monkeypatch):
    with pytest.raises(runtime.RuntimeFailure, match="loopback"):
        runtime.start_supernode(tmp_path / "a", "s", "10.0.0.5:9300", 1, {}, pin_app=False)
    monkeypatch.setattr(app_trust, "flower_version", lambda: "1.43.0")
    with pytest.raises(runtime.RuntimeFailure, match="refusing to join"):
        runtime.start_supernode(tmp_path / "b", "s", "superlink.example.org:9300", 1, {},
                                root_certificates=tmp_path / "ca.crt")
    assert not (tmp_path / "b").exists()


def test_is_loopback_address():
    for a in ("127.0.0.1:9300", "localhost:1", "[::1]:9300", "::1", "127.3.4.5", "localhost"):
        assert is_loopback_address(a), a
    for a in ("10.0.0.1:9300", "0.0.0.0:9300", "superlink.example.org:9300", "[2001:db8::1]:9300", "::"):
        assert not is_loopback_address(a), a


def test_site_join_refuses_off_loopback_without_pin(tmp_path, monkeypatch):
    table = tmp_path / "t.csv"
    table.write_text("case_id,x\n1,2\n")
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "key").write_text("x")
    monkeypatch.setattr(app_trust, "flower_version", lambda: "1.43.0")
    res = CliRunner().invoke(cli_app, ["site", "join", "--superlink", "superlink.example.org:9300", "--name", "s1",
                                       "--table", str(table), "--workdir", str(tmp_path / "w"),
                                       "--root-certificates", str(tmp_path / "ca.crt"),
                                       "--auth-key", str(tmp_path / "key")])
    assert res.exit_code == 1 and "refusing to join" in res.output, res.output


def test_study_run_refuses_insecure_off_loopback(tmp_path):
    study = tmp_path / "study.toml"
    study.write_text("this file is never read")
    for address in ("10.0.0.5:9300", "superlink.example.org:9300", "0.0.0.0:9300"):
        res = CliRunner().invoke(cli_app, ["study", "run", str(study), "--superlink", address])
        assert res.exit_code == 1 and "--root-certificates" in res.output and "not loopback" in res.output
    res = CliRunner().invoke(cli_app, ["study", "run", str(study), "--superlink", "10.0.0.5:9300",
                                       "--root-certificates", str(tmp_path / "missing.crt")])
    assert res.exit_code == 1 and "not found" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.toml"]  # refused before anything was written
