"""The approval screen through the real ``fedrad site approve`` (a subprocess, as a site operator runs it):
identifier-like columns, the ``[columns] features`` allow-list (also where the site answers requests), every option
and budget on the screen, escaped and refused names, the confirmation prompt, and the site agent's file modes."""
from __future__ import annotations

import json
import os
import pty
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedrad.common.plan import plan_id, study_plan
from fedrad.server.study_config import load_study
from tests.test_site_guard import TEST_SIGNER, ask, refused

FEDRAD = os.path.join(os.path.dirname(sys.executable), "fedrad")
FEATURES = ["original_glcm_Contrast", "original_firstorder_Mean", "wavelet-LLH_glcm_Idmn", "original_glszm_ZoneEntropy",
            "original_shape_Elongation"]


def approve(*args, cwd=None, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    return subprocess.run([FEDRAD, "site", "approve", *map(str, args)], capture_output=True, text=True, timeout=120,
                          cwd=cwd, stdin=stdin)


def site_table(path: Path, n: int = 60, seed: int = 0) -> pd.DataFrame:
    """A site's table: radiomic features, clinical columns, and identifier-like columns (numeric MRN, dob as
    yyyymmdd, zip, an unnamed date column, a record number) that must never become features."""
    rng = np.random.default_rng(seed)
    d = pd.DataFrame(rng.normal(size=(n, len(FEATURES))), columns=FEATURES)
    d["original_shape_VoxelVolume"] = np.exp(rng.normal(7, 0.5, n))
    d["MRN"] = rng.integers(10 ** 6, 10 ** 7, n)
    d["dob"] = rng.integers(1930, 2000, n) * 10000 + rng.integers(1, 13, n) * 100 + rng.integers(1, 29, n)
    d["zip"] = rng.integers(10000, 99999, n)
    d["PatientName_code"] = rng.normal(size=n)   # numeric, but its name says what it is
    d["admitted"] = d["dob"] + 400000              # dates under an innocent name
    d["record"] = np.arange(n) + 7000              # near-unique integers under an innocent name
    d["age"], d["sex"], d["stage"] = rng.normal(60, 8, n), rng.choice(["F", "M"], n), rng.integers(1, 5, n)
    d["response"] = (rng.random(n) < 0.5).astype(int)
    d["case_id"] = [f"c{i}" for i in range(n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    d.to_parquet(path)
    return d


def write_site(tmp_path: Path, columns: str = "", name: str = "hosp0") -> Path:
    site_table(tmp_path / name / "features.parquet")
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(f'[site]\nname = "{name}"\ntable = "{name}/features.parquet"\nworkdir = "{name}/work"\n'
                   f"[policy]\nmin-cell-size = 10\n{columns}")
    return cfg


#: the coordinator's public signing key every study here names (a study plan without one is refused, below);
#: the tests' ``ask`` signs with it
KEY = TEST_SIGNER.public
COORDINATOR = f'[coordinator]\nkey = "{KEY}"\n'


def write_study(tmp_path: Path, extra: str = "", clinical: str = '["age", "stage"]', file: str = "study.toml") -> Path:
    path = tmp_path / file
    path.write_text(COORDINATOR + '[study]\nname = "t"\nmin_sites = 2\n[endpoint]\ntype = "response"\noutcome = "response"\n'
                    '[sites.hosp0]\n[sites.hosp1]\n[harmonization]\ncovariates = ["age", "sex"]\n'
                    'categorical = ["sex"]\n'
                    f'[model]\nclinical = {clinical}\n{extra}')
    return path


def one_error_line(res) -> str:
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedrad: error: ") and "Traceback" not in res.stderr, res.stderr
    return lines[0]


def candidates_line(out: str) -> str:
    """The screen's candidate-features entry, continuation lines joined."""
    lines = out.splitlines()
    i = next(i for i, ln in enumerate(lines) if "candidate features at this site" in ln)
    j = i + 1
    while j < len(lines) and lines[j].startswith("      "):
        j += 1
    return " ".join(ln.strip() for ln in lines[i:j])


def test_identifier_like_columns_are_never_features_and_refused_as_variables(tmp_path):
    cfg = write_site(tmp_path)
    study = write_study(tmp_path)
    res = approve(study, "--config", cfg, "--yes")
    assert res.returncode == 0, res.stdout + res.stderr
    line = candidates_line(res.stdout)
    shown = line.split(": ", 2)[2].replace(",", " ").split()
    assert shown == FEATURES + ["original_shape_VoxelVolume", "record"], line
    assert "7 of the 17 columns" in line
    assert "WARNING: table column 'admitted' holds yyyymmdd dates only" in res.stdout
    assert "WARNING: candidate feature 'record' holds near-unique integers" in res.stdout
    # the site computes the same candidates when it answers the approved plan's first request
    pid = plan_id(study_plan(load_study(study)))
    reply = ask({"config": str(cfg)}, "study_prepare", {"plan": pid})
    assert reply["features"] == FEATURES + ["original_shape_VoxelVolume", "record"]
    assert reply["volume"] == "original_shape_VoxelVolume"
    # a plan naming any of them as a variable is refused at a site without an allow-list, in one line naming it
    cases = {"clinical MRN": write_study(tmp_path, clinical='["age", "MRN"]', file="a.toml"),
             "clinical dob": write_study(tmp_path, clinical='["dob"]', file="b.toml"),
             "clinical patient_name": write_study(tmp_path, clinical='["age", "patient_name"]', file="c.toml"),
             "covariate dob": write_study(tmp_path, file="d.toml"),
             "batch zip": write_study(tmp_path, extra="", file="e.toml"),
             "marker": tmp_path / "f.toml"}
    text = cases["covariate dob"].read_text().replace('covariates = ["age", "sex"]', 'covariates = ["dob", "sex"]')
    cases["covariate dob"].write_text(text)
    text = cases["batch zip"].read_text().replace('categorical = ["sex"]\n', 'categorical = ["sex"]\nbatch = "zip"\n')
    cases["batch zip"].write_text(text)
    cases["marker"].write_text(write_study(tmp_path, file="f.toml").read_text().replace(
        'name = "t"', 'name = "t"\nkind = "association"') + '[association]\nmarkers = ["BirthDate"]\n')
    for what, path in cases.items():
        err = one_error_line(approve(path, "--config", cfg, "--yes"))
        col = {"clinical MRN": "MRN", "clinical dob": "dob", "clinical patient_name": "patient_name",
               "covariate dob": "dob", "batch zip": "zip", "marker": "BirthDate"}[what]
        assert f"identifier-like column '{col}'" in err and "[columns]" in err, (what, err)
    assert not (tmp_path / "hosp0" / "work" / "plans" / f"{plan_id(study_plan(load_study(cases['marker'])))}.json"
                ).exists()
    # the site lists dob in its allow-list: approved, loudly
    cfg2 = write_site(tmp_path, '[columns]\noutcome = ["response"]\nclinical = ["dob", "age", "sex", "stage"]\n'
                      'categorical = ["sex"]\n', name="hosp9")
    res = approve(cases["clinical dob"], "--config", cfg2, "--yes")
    assert res.returncode == 0, res.stderr
    assert "WARNING: identifier-like column 'dob' is used as clinical, approved only because site.toml [columns] " \
           "clinical lists it" in res.stdout
    assert "WARNING: plan column 'dob' holds yyyymmdd dates at this site" in res.stdout


def test_columns_features_restricts_the_candidates_at_approval_and_at_request_time(tmp_path):
    cfg = write_site(tmp_path, '[columns]\noutcome = ["response"]\nclinical = ["age", "sex", "stage"]\n'
                     'categorical = ["sex"]\nfeatures = ["original_glcm_*", "original_firstorder_*"]\n')
    study = write_study(tmp_path)
    res = approve(study, "--config", cfg, "--yes")
    assert res.returncode == 0, res.stdout + res.stderr
    line = candidates_line(res.stdout)
    assert line.endswith("original_glcm_Contrast, original_firstorder_Mean"), line
    assert "site allow-list ([columns] features): original_glcm_*, original_firstorder_*" in res.stdout
    node = {"config": str(cfg)}
    pid = plan_id(study_plan(load_study(study)))
    reply = ask(node, "study_prepare", {"plan": pid})
    assert reply["features"] == ["original_glcm_Contrast", "original_firstorder_Mean"]
    assert reply["volume"] is None  # the volume column does not match the site's patterns
    from fedrad.common.combat import make_request

    wide = make_request(["original_glcm_Contrast", "wavelet-LLH_glcm_Idmn"], ["age", "sex"], ["sex"])
    refused(node, "combat_stats", {"plan": pid, "request": wide, "table": "raw"}, "outside-plan")
    ok = make_request(["original_glcm_Contrast", "original_firstorder_Mean"], ["age", "sex"], ["sex"])
    assert ask(node, "combat_stats", {"plan": pid, "request": ok, "table": "raw"})["site"] == "hosp0"
    # [columns] without a features key: fedrad's pyradiomics names and the plan's volume column only
    cfg2 = write_site(tmp_path, '[columns]\noutcome = ["response"]\nclinical = ["age", "sex", "stage"]\n'
                      'categorical = ["sex"]\n', name="hosp1")
    line = candidates_line(approve(study, "--config", cfg2, "--show").stdout)
    assert line.endswith(", ".join(FEATURES + ["original_shape_VoxelVolume"])), line  # not 'record'


def test_the_screen_shows_candidates_every_risky_option_and_the_budgets(tmp_path):
    from fedrad.client.guard import MAX_ATTEMPTS, MAX_TASK_ROUNDS

    cfg = write_site(tmp_path)
    study = tmp_path / "risky.toml"
    study.write_text(COORDINATOR + '[study]\nname = "risky"\nmin_sites = 2\n[endpoint]\ntype = "survival"\ntime = "os_time"\n'
                     'event = "os_event"\n[sites.hosp0]\n[sites.hosp1]\n[harmonization]\ncovariates = ["sex"]\n'
                     'categorical = ["sex"]\nbatch = "stage"\ncovbat = true\nsmooth = { age = [18, 60, 60.1, 95] }\n'
                     '[selection]\nmax_features = 500\nfdr = 1.0\nredundancy = 1.0\nicc_threshold = 0.8\n'
                     'max_missing = 0.3\n[model]\nclinical = ["age"]\n'
                     '[validation]\nloso = true\ninner_folds = 4\nseed = 7\ndca_horizon = 24\n')
    res = approve(study, "--config", cfg, "--show")
    assert res.returncode == 0, res.stderr
    out = " ".join(res.stdout.split())  # continuation lines joined
    for text in ["! batch column 'stage' does not look like an acquisition column",
                 "! CovBat (PCs explaining 95%): per batch, the F x F cross-products of the ComBat residuals leave",
                 "! knots 0.1 apart", "! max_features = 500", "! fdr = 1: no screening",
                 "! redundancy = 1: no correlation filter", "ICC(1,1) >= 0.8", "more than 30% of a site's patients",
                 "leave-one-site-out yes; inner folds 4 (seed 7", "decision curves at horizon 24",
                 "subgroups: sex, age", "ComBat parametric empirical Bayes", "references:",
                 f"at most {MAX_ATTEMPTS} study attempts", f"at most {MAX_TASK_ROUNDS} model evaluations",
                 # 7: the table's response column is another endpoint's here (endpoint-like, never a feature)
                 "candidate features at this site: 7 of the 17 columns", "original_glszm_ZoneEntropy"]:
        assert text in out, text
    assert "every numeric column not named above" not in out
    # a quiet plan has no flag
    quiet = approve(write_study(tmp_path), "--config", cfg, "--show")
    assert quiet.returncode == 0 and "! " not in quiet.stdout, quiet.stdout
    # a table of 1,000 features: counted by prefix, every name with --list-features; no line over 110 characters
    rng = np.random.default_rng(1)
    names = [f"{t}_{c}_F{i}" for t in ("original", "wavelet-LLH") for c in ("glcm", "glrlm", "firstorder", "shape")
             for i in range(125)]
    big = pd.DataFrame(rng.normal(size=(30, len(names))), columns=names)
    big["age"], big["sex"], big["stage"] = rng.normal(60, 8, 30), rng.choice(["F", "M"], 30), rng.integers(1, 5, 30)
    big["response"] = rng.integers(0, 2, 30)
    big.to_parquet(tmp_path / "hosp0" / "features.parquet")
    res = approve(write_study(tmp_path), "--config", cfg, "--show")
    line = candidates_line(res.stdout)
    assert "1000 of the 1004 columns" in line and "original_glcm_* 125" in line and "wavelet-LLH_shape_* 125" in line
    assert max(map(len, res.stdout.splitlines())) <= 112 and len(res.stdout.splitlines()) < 60
    every = approve(write_study(tmp_path), "--config", cfg, "--show", "--list-features").stdout
    assert all(n in every for n in names)


def test_non_ascii_names_are_escaped_and_refused_and_control_characters_always(tmp_path):
    cfg = write_site(tmp_path)
    fake = "\u0430ge"  # a Cyrillic a
    res = approve(write_study(tmp_path, clinical=json.dumps([fake, "stage"])), "--config", cfg, "--yes")
    err = one_error_line(res)
    assert "column '\\u0430ge' (clinical) contains non-ASCII characters; it may imitate 'age'" in err, err
    assert fake not in res.stdout + res.stderr
    assert not (tmp_path / "hosp0" / "work" / "plans").exists()
    rlo = "age\u202e"
    res = approve(write_study(tmp_path, clinical=json.dumps([rlo])), "--config", cfg, "--yes")
    err = one_error_line(res)
    assert "'age\\u202e'" in err and "U+202E" in err and "\u202e" not in res.stdout + res.stderr, err
    # an allow-list naming the Cyrillic column exactly lets it through, printed escaped
    cfg2 = write_site(tmp_path, f'[columns]\noutcome = ["response"]\nclinical = ["{fake}", "age", "sex", "stage"]\n'
                      'categorical = ["sex"]\n', name="hosp9")
    res = approve(write_study(tmp_path, clinical=json.dumps([fake, "stage"])), "--config", cfg2, "--yes")
    assert res.returncode == 0, res.stderr
    assert "clinical columns: \\u0430ge, stage" in res.stdout and fake not in res.stdout
    # ... but never a control character, even allow-listed; nor one in the site's own table columns
    cfg3 = write_site(tmp_path, '[columns]\noutcome = ["response"]\nclinical = ["age\\u202e", "age", "sex", '
                      '"stage"]\ncategorical = ["sex"]\n', name="hosp8")
    assert "U+202E" in one_error_line(approve(write_study(tmp_path, clinical=json.dumps([rlo])), "--config", cfg3,
                                              "--yes"))
    table = pd.read_parquet(tmp_path / "hosp0" / "features.parquet")
    table["original_glcm_\u202eF"] = 1.0
    table.to_parquet(tmp_path / "hosp0" / "features.parquet")
    err = one_error_line(approve(write_study(tmp_path), "--config", cfg, "--yes"))
    assert "table column 'original_glcm_\\u202eF'" in err and "rename it" in err, err


def test_the_prompt_refuses_without_a_terminal_and_approves_with_yes_or_y(tmp_path):
    cfg = write_site(tmp_path)
    study = write_study(tmp_path)
    pid = plan_id(study_plan(load_study(study)))
    stored = tmp_path / "hosp0" / "work" / "plans" / f"{pid}.json"
    err = one_error_line(approve(study, "--config", cfg))
    assert f"plan {pid[:12]} not approved: no terminal" in err and "--yes" in err
    assert not stored.exists()
    assert "not approved: --show" in approve(study, "--config", cfg, "--show").stdout and not stored.exists()

    def on_a_terminal(answer: str) -> tuple[int, str]:
        main, child = pty.openpty()
        proc = subprocess.Popen([FEDRAD, "site", "approve", str(study), "--config", str(cfg)], stdin=child,
                                stdout=child, stderr=child, close_fds=True)
        os.close(child)
        seen, deadline, sent = b"", time.monotonic() + 60, False
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(main, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                seen += chunk
            if not sent and b"[y/N]" in seen:
                os.write(main, answer.encode() + b"\n")
                sent = True
            if proc.poll() is not None and not ready:
                break
        os.close(main)
        return proc.wait(timeout=30), seen.decode(errors="replace")

    code, text = on_a_terminal("n")
    assert f"approve plan {pid[:12]} at site hosp0? [y/N]" in text, text
    assert code == 1 and "not approved (answered no)" in text and not stored.exists()
    code, text = on_a_terminal("y")
    assert code == 0 and f"approved plan {pid}" in text and stored.exists(), text
    stored.unlink()
    res = approve(study, "--config", cfg, "--yes")
    assert res.returncode == 0 and f"approved plan {pid}" in res.stdout and stored.exists()


PERMISSIONS = r"""
import os, sys
os.umask(0o022)                       # what a shell usually gives: the site must not depend on it
from pathlib import Path
from fedrad.client.site import Site
from tests.test_site_guard import ask
from fedrad.common.plan import plan_id, study_plan
from fedrad.server.study_config import load_study
from fedrad.server import runtime
cfg, study = sys.argv[1], sys.argv[2]
pid = plan_id(study_plan(load_study(study)))
ask({"config": cfg}, "study_prepare", {"plan": pid})
try:
    ask({"config": cfg}, "study_prepare", {"plan": "0" * 64})
except Exception:
    pass                               # refused: written to site.log and the audit log
site = Site.from_node_config({"config": cfg})
for old in (site.workdir / "flower" / "supernode.log", site.workdir / "site.log"):  # an earlier version's logs
    old.parent.mkdir(exist_ok=True)
    old.touch()
    old.chmod(0o644)
site.log_local("data", "a line in an older log")
proc = runtime.start_supernode(site.workdir / "flower", site.name, "127.0.0.1:9", 9399, {"config": cfg},
                               fast=False, pin_app=False)
proc.stop(timeout=15)
"""


def test_the_site_agent_creates_private_folders_and_files(tmp_path):
    cfg = write_site(tmp_path)
    study = write_study(tmp_path)
    work = tmp_path / "hosp0" / "work"
    res = subprocess.run(["sh", "-c", f'umask 022; exec "{FEDRAD}" site approve "{study}" --config "{cfg}" --yes'],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([sys.executable, "-c", PERMISSIONS, str(cfg), str(study)], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, res.stderr
    for name in ("site.log", "audit.jsonl", "flower/supernode.log"):
        assert (work / name).is_file(), name
    folders = [work, *[p for p in work.rglob("*") if p.is_dir()]]
    files = [p for p in work.rglob("*") if p.is_file()]
    assert {"plans", "ledger", "harmonized", "flower"} <= {p.name for p in folders}
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in folders} == {"0o700"}, \
        {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in folders}
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {"0o600"}, \
        {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}


def test_a_study_plan_names_the_coordinators_key_or_is_refused(tmp_path):
    from fedrad.common.signing import fingerprint

    cfg = write_site(tmp_path)
    res = approve(write_study(tmp_path), "--config", cfg, "--show")
    assert f"coordinator signing key: {fingerprint(KEY)} {KEY} the site answers only requests signed by it" in \
        " ".join(res.stdout.split()), res.stdout
    keyless = tmp_path / "keyless.toml"
    keyless.write_text(write_study(tmp_path).read_text().replace(COORDINATOR, ""))
    err = one_error_line(approve(keyless, "--config", cfg, "--yes"))
    assert "names no [coordinator] key" in err and "fedrad coordinator keys" in err
    assert not list((tmp_path / "hosp0" / "work" / "plans").glob("*.json"))
    res = approve(keyless, "--config", cfg, "--yes", "--unsigned")
    assert res.returncode == 0 and "WARNING: the plan names no [coordinator] key" in res.stdout, res.stdout
