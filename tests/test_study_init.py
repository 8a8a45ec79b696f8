"""A starting point ships: ``examples/`` holds a valid study file per study kind (the demo's among them), and
``fedrad study init TABLE...`` drafts a commented study.toml from the sites' tables that a local rehearsal runs
as it is."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest

from fedrad.server.study_config import load_study
from tests.test_study import make_sites

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
KINDS = {"response": "response", "survival": "survival", "continuous": "continuous", "association": "association"}


def _comparable(cfg: dict) -> dict:
    cfg = {k: v for k, v in cfg.items() if k not in ("sites", "coordinator")}
    cfg["study"] = {k: v for k, v in cfg["study"].items() if k not in ("output", "file")}
    return cfg


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_example_is_the_demos_study_of_its_kind(kind):
    from fedrad.demo import study_config

    path = EXAMPLES / f"{kind}.toml"
    cfg = load_study(path)
    assert list(cfg["sites"]) == ["site1", "site2", "site3"]
    demo = study_config({f"site{i}": Path("m.csv") for i in (1, 2, 3)}, KINDS[kind], "ct-original", Path("/o"))
    assert _comparable(cfg) == _comparable(demo)
    text = path.read_text()
    assert '# key = "ssh-ed25519' in text and "fedrad coordinator keys" in text
    assert all(len(line) <= 120 for line in text.splitlines())


def test_the_examples_cover_every_study_kind():
    assert sorted(p.stem for p in EXAMPLES.glob("*.toml")) == sorted(KINDS)
    assert "examples/" in (EXAMPLES.parent / "README.md").read_text()


def _init(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedrad.cli", "study", "init", *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=cwd)


def test_study_init_detects_the_columns_and_its_draft_runs_as_a_rehearsal(tmp_path):
    _, nodes, _ = make_sites(tmp_path / "sites", survival=False)
    tables = [Path(n["table"]) for n in nodes]
    res = _init(*tables, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "study.toml").read_text()
    doc = tomllib.loads(text)
    assert doc["endpoint"] == {"type": "response", "outcome": "response"}
    assert '# type = "survival"; time = "os_time"; event = "os_event"' in text
    assert '# type = "response"; outcome = "egfr_mutant"' in text
    assert "# Detected: id column case_id;" in text
    assert doc["model"]["volume"] == "original_shape_VoxelVolume"
    assert doc["model"]["clinical"] == ["age", "stage"]
    assert doc["harmonization"]["covariates"] == ["age", "sex"] and doc["harmonization"]["categorical"] == ["sex"]
    assert set(doc["selection"]["exclude"]) == {"egfr_mutant", "os_time", "os_event"}
    assert "immune_score" in text  # named as a column to check (a score, not a radiomic feature)
    assert list(doc["sites"]) == ["hosp0", "hosp1", "hosp2", "hosp3"]
    assert "[coordinator]" in text and '# key = "ssh-ed25519' in text and "fedrad coordinator keys" in text
    for section in ("study", "endpoint", "harmonization", "selection", "model", "validation"):
        assert f"[{section}]" in text
    cfg = load_study(tmp_path / "study.toml")
    assert Path(cfg["sites"]["hosp0"]["table"]).resolve() == tables[0].resolve()
    run = subprocess.run([sys.executable, "-m", "fedrad.cli", "study", "run", "study.toml", "--runtime", "local"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "results" / "results.json").is_file()
    again = _init(*tables, cwd=tmp_path)  # never overwrites a study file without --force
    assert again.returncode == 1 and "study.toml exists" in again.stderr.strip().splitlines()[-1]


def test_study_init_on_survival_tables_only_drafts_a_survival_study(tmp_path):
    for name in ("hosp_a", "hosp_b"):
        d = pd.DataFrame({"case_id": [f"{name}-{i}" for i in range(30)], "pfs_months": [float(i) for i in range(30)],
                          "pfs_event": [i % 2 for i in range(30)], "age": [50 + i for i in range(30)],
                          "original_glcm_Contrast": [0.1 * i for i in range(30)]})
        d.to_csv(tmp_path / f"{name}.csv", index=False)
    res = _init(tmp_path / "hosp_a.csv", tmp_path / "hosp_b.csv", "--out", "s.toml", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    doc = tomllib.loads((tmp_path / "s.toml").read_text())
    assert doc["endpoint"] == {"type": "survival", "time": "pfs_months", "event": "pfs_event"}
    assert list(doc["sites"]) == ["hosp_a", "hosp_b"] and doc["study"]["min_sites"] == 2
