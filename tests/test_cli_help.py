"""Every command's ``--help``, rendered by the real console script: every ``[section]`` its help texts name
("[site] name/table/workdir", "[sites] count, else [study] min_sites") is printed as written, not swallowed as
rich markup."""
from __future__ import annotations

import os
import re
import subprocess

import click
import typer.main

from fedrad.cli import app
from fedrad.server.runtime import BIN

#: a bracketed name as help texts write it (escaped for rich with a backslash in the loaded app)
BRACKETED = re.compile(r"\\?(\[[^\[\]\s]+\])")


def _commands(command: click.Command, path: tuple[str, ...] = ()):
    """(path, click command) of every command and group under ``command``, itself included."""
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, path + (name,))


def _bracketed(command: click.Command) -> set[str]:
    texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
    return {m for text in texts for m in BRACKETED.findall(text)}


def test_every_help_text_keeps_its_bracketed_sections():
    root = typer.main.get_command(app)
    commands = list(_commands(root))
    assert len(commands) >= 20 and ("site", "join") in dict(commands)
    wanted_somewhere = {"[site]", "[sites]", "[study]", "[policy]"}
    seen: set[str] = set()
    env = {**os.environ, "COLUMNS": "100", "TERM": "dumb", "NO_COLOR": "1"}
    for path, command in commands:
        wanted = _bracketed(command)
        seen |= wanted
        out = subprocess.run([str(BIN / "fedrad"), *path, "--help"], capture_output=True, text=True, env=env,
                             timeout=60)
        assert out.returncode == 0, (path, out.stderr)
        text = re.sub(r"\s|│", "", re.sub(r"\x1b\[[0-9;]*m", "", out.stdout))
        lost = sorted(w for w in wanted if w not in text)
        assert not lost, f"`fedrad {' '.join(path)} --help` lost {lost}:\n{out.stdout}"
        assert "\\[" not in out.stdout, out.stdout  # no escape shows
    assert wanted_somewhere <= seen, seen


def test_site_help_lists_every_site_command():
    out = subprocess.run([str(BIN / "fedrad"), "site", "--help"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "COLUMNS": "100", "TERM": "dumb"})
    group = typer.main.get_command(app).commands["site"]
    summary = group.help.split("\n\n")[0]
    for name in group.commands:
        assert f"({name}" in summary or f" {name}," in summary or f"{name})" in summary, (name, summary)
        assert name in out.stdout


def test_every_shipped_parameter_file_is_documented():
    """`--params` of site extract and robustness (the real commands' help) and the README name every shipped
    parameter file, ct-original included."""
    from pathlib import Path

    from fedrad.client.extract import SHIPPED_PARAMS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for command in ("extract", "robustness"):
        out = subprocess.run([str(BIN / "fedrad"), "site", command, "--help"], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "COLUMNS": "200", "TERM": "dumb"})
        text = " ".join(re.sub(r"│", " ", out.stdout).split())
        for name in SHIPPED_PARAMS:
            assert f"'{name}'" in text, (command, name, text)
    for name in SHIPPED_PARAMS:
        assert f"`{name}`" in readme, name


def test_counts_take_the_right_number_and_the_license_is_an_spdx_string():
    import tomllib
    from pathlib import Path

    from fedrad.common.text import plural, verb

    assert plural(1, "round trip") == "1 round trip" and plural(2, "round trip") == "2 round trips"
    assert plural(0, "analysis", "analyses") == "0 analyses"
    assert f"stage {verb(1, 'differs', 'differ')}" == "stage differs" and verb(2, "differs", "differ") == "differ"
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"  # PEP 639; the {text = ...} table is deprecated
