"""A local rehearsal (``fedrad study run --runtime local``) shows a site's own reason for a data error, and a
rehearsal that had to leave a site out for one exits 1: on one machine the same person runs every site.

Real command in a subprocess, four synthetic sites (tests.test_study.make_sites), one of them broken.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.test_study import make_sites

STUDY = """[study]
name = "rehearsal"
min_sites = {min_sites}
output = "results"
[endpoint]
type = "response"
outcome = "response"
[harmonization]
covariates = ["age", "sex"]
categorical = ["sex"]
[selection]
exclude = ["response", "os_*", "immune_score", "egfr_mutant"]
[model]
clinical = ["age", "stage"]
grid = [0.01, 0.1, 1.0]
"""


def write_rehearsal(tmp_path: Path, min_sites: int = 3, sites: dict | None = None) -> tuple[Path, list[dict]]:
    _, nodes, _ = make_sites(tmp_path / "sites", survival=False)
    tables = sites or {n["site-name"]: n["table"] for n in nodes}
    study = tmp_path / "study.toml"
    study.write_text(STUDY.format(min_sites=min_sites)
                     + "".join(f'[sites.{name}]\ntable = "{table}"\n' for name, table in tables.items()))
    return study, nodes


def _run(study: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedrad.cli", "study", "run", str(study), "--runtime", "local"],
                          capture_output=True, text=True, timeout=600, cwd=study.parent)


@pytest.mark.parametrize("broken", ["text-age", "missing-table"])
def test_a_data_error_at_a_rehearsal_site_names_its_reason_and_exits_1(tmp_path, broken):
    study, nodes = write_rehearsal(tmp_path)
    table = Path(nodes[3]["table"])
    if broken == "text-age":
        d = pd.read_parquet(table)
        d["age"] = d["age"].map(lambda a: f"{a:.0f} years")
        d.to_parquet(table)
        reason = "continuous covariates ['age'] at site 'hosp3' must be numeric"
    else:
        table.unlink()
        reason = f"feature table {table} not found"
    run = _run(study)
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    lost = [line for line in lines if line.startswith("site hosp3 lost: ")]
    assert len(lost) == 1 and reason in lost[0], lines  # said when the site is dropped, with the site's reason
    assert any("restarting the study with the 3 remaining sites" in line for line in lines)
    assert lines[-1].startswith("fedrad: error: the rehearsal left out hosp3: ") and reason in lines[-1]
    assert "run the rehearsal again" in lines[-1]
    assert (tmp_path / "results" / "results.json").is_file()  # the other sites' results are still written


def test_a_plan_no_rehearsal_site_can_run_says_so_in_one_line(tmp_path):
    """Every site's data broken: the quorum is lost; one line counts the sites (not the coordinator's reason)."""
    study, nodes = write_rehearsal(tmp_path)
    for node in nodes:
        Path(node["table"]).unlink()
    run = _run(study)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("fedrad: error: 4 site(s) failed during study_prepare: hosp0: "), last
    assert "quorum lost" in last and "not found" in last
