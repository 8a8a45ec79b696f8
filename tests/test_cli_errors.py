"""Every `fedrad` command turns an expected failure into one line ``fedrad: error: ...`` and exit status 1.

Each case runs the real console entry (``python -m fedrad.cli``, which calls :func:`fedrad.cli.main`) in a
subprocess on bad input and asserts: exit 1, no traceback, stderr's last line is the error, it names what was
wrong. ``test_every_command_has_a_bad_input_case`` fails when a command is added without a case here.
"""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedrad.cli import _one_line, app


def _cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """command path -> (argv after `fedrad`, a fragment the error line must contain)."""
    afile = tmp / "a-file.txt"
    afile.write_text("not a directory\n")
    garbage = tmp / "garbage.csv"
    garbage.write_bytes(b"\x00\x01\x02\xff\xfe")
    table = tmp / "table.csv"
    table.write_text("case_id,site,x\nc1,a,1.0\nc2,b,2.0\n")
    notjson = tmp / "results.json"
    notjson.write_text("{ not json")
    badtoml = tmp / "study.toml"
    badtoml.write_text("[study]\nname = 'x'\nnot_a_key = 3\n")
    missing = tmp / "nope.csv"
    return {
        "demo-data": (["demo-data", "--out", str(afile)], str(afile)),
        "demo": (["demo", "--out", str(tmp / "d"), "--params", str(tmp / "nope.yaml")], "nope.yaml"),
        "site check": (["site", "check", str(missing)], "nope.csv"),
        "site extract": (["site", "extract", str(missing), "--out", str(tmp / "f.parquet")], "nope.csv"),
        "site join": (["site", "join", "--superlink", "192.0.2.1:9092", "--name", "a", "--table", str(table),
                       "--insecure"], "--insecure is refused"),
        "site keys": (["site", "keys", "--out", str(afile / "sub")], "a-file.txt"),
        "site audit": (["site", "audit", str(tmp / "no-such-dir" / "audit.jsonl")], "audit"),
        "site approve": (["site", "approve", str(tmp / "no-plan.toml"), "--workdir", str(tmp / "w")], "no-plan"),
        "site robustness": (["site", "robustness", str(missing), "--out", str(tmp / "r.parquet")], "nope.csv"),
        "site delta": (["site", "delta", str(table), "--out", str(tmp / "delta.csv")], "timepoint"),
        "coordinator certs": (["coordinator", "certs", "--out", str(afile / "sub")], "a-file.txt"),
        "coordinator start": (["coordinator", "start", "--home", str(tmp / "c"), "--host", "0.0.0.0",
                               "--insecure"], "loopback"),
        "coordinator keys": (["coordinator", "keys", "--home", str(afile / "sub")], "a-file.txt"),
        "coordinator status": (["coordinator", "status", "--home", str(tmp / "no-coordinator")], "no-coordinator"),
        "coordinator register-site": (["coordinator", "register-site", str(tmp / "no.pub"), "--name", "a",
                                       "--home", str(tmp / "c")], "no.pub"),
        "harmonize": (["harmonize", str(garbage), "--batch-col", "site", "--out", str(tmp / "h.csv")],
                      "garbage.csv"),
        "fit": (["fit", str(table), "--site-col", "hospital", "--model", "logistic", "--outcome", "x",
                 "--features", "x", "--out", str(tmp / "m.json")], "hospital"),
        "predict": (["predict", str(notjson), str(table)], "results.json"),
        "study run": (["study", "run", str(badtoml), "--runtime", "local"], "not_a_key"),
        "study report": (["study", "report", str(notjson)], "not JSON"),
        "study init": (["study", "init", str(missing), "--out", str(tmp / "drafted.toml")], "nope.csv"),
    }


def _commands(group=None, prefix: str = "") -> set[str]:
    import typer.main

    group = group if group is not None else typer.main.get_command(app)
    out: set[str] = set()
    for name, cmd in group.commands.items():
        path = f"{prefix}{name}"
        out |= _commands(cmd, path + " ") if hasattr(cmd, "commands") else {path}
    return out


def test_every_command_has_a_bad_input_case(tmp_path):
    assert _commands() == set(_cases(tmp_path)), "give each new command a bad-input case in _cases"


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedrad.cli", *argv], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_each_command_fails_on_bad_input_in_one_line(tmp_path):
    cases = _cases(tmp_path)
    with ThreadPoolExecutor(max_workers=3) as pool:
        runs = dict(zip(cases, pool.map(lambda c: _run(c[0], tmp_path), cases.values())))
    problems = []
    for name, run in runs.items():
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        fragment = cases[name][1]
        if run.returncode != 1 or "Traceback" in run.stderr or not last.startswith("fedrad: error: ") \
                or fragment not in last:
            problems.append(f"{name}: exit {run.returncode}, stderr {run.stderr[-600:]!r}")
    assert not problems, "\n".join(problems)


def test_a_usage_error_exits_2_in_one_line(tmp_path):
    run = _run(["fit", "--no-such-option"], tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("fedrad: error: ")


@pytest.mark.parametrize(("message", "line"), [("a\n  b\tc\n\n", "a; b c"), ("x" * 3000, "x" * 1996 + " ...")])
def test_one_line(message, line):
    assert _one_line(message) == line
